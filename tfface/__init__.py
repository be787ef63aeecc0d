"""tfface: multi-task face attribute recognition for Keras 3 / TensorFlow."""

import importlib

__version__ = "0.2.11"

# Subpackages load on first use (`tfface.models.GatedMultiTaskModel` after a
# plain `import tfface`), so `import tfface` and `tfface --help` stay fast.
_SUBMODULES = (
    "config", "data", "evaluation", "export", "landmarks", "layers", "losses", "metrics", "models",
    "predict", "presets", "schema", "serving", "training", "tuning",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
