"""Face data: sources (CelebA, UTKFace, synthetic, your own arrays), the
person-disjoint split and the fused tf.data pipeline.

The names below load on first use, as the subpackages of `tfface` do: the
modules of this package import one another, and the gRPC client needs
only `image_ops`.
"""

import importlib

_EXPORTS = {
    "FaceSource": "tfface.data.source",
    "make_dataset": "tfface.data.pipeline",
    "open_source": "tfface.data.sources",
    "split_source": "tfface.data.splits",
    "write_synthetic_folder": "tfface.data.synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
