"""Training runs: `train` (the `tfface train` command), resume, checkpoints.
The names below load on first use (`tfface.lazy_exports`)."""

from tfface.lazy_exports import lazy_exports

_EXPORTS = {"make_datasets": "tfface.training.trainer", "train": "tfface.training.trainer"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
