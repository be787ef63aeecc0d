"""Training runs: `train` (the `tfface train` command), resume, checkpoints.

`train` and `make_datasets` load on first use, as the subpackages of
`tfface` do.
"""

import importlib

_EXPORTS = {"make_datasets": "tfface.training.trainer", "train": "tfface.training.trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
