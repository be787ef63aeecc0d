"""Face data: sources (CelebA, UTKFace, synthetic, your own arrays), the
person-disjoint split and the fused tf.data pipeline. The names below load
on first use (`tfface.lazy_exports`)."""

from tfface.lazy_exports import lazy_exports

_EXPORTS = {
    "FaceSource": "tfface.data.source",
    "make_dataset": "tfface.data.pipeline",
    "open_source": "tfface.data.sources",
    "split_source": "tfface.data.splits",
    "write_synthetic_folder": "tfface.data.synthetic",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
