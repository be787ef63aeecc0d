"""tfface: multi-task face attribute recognition for Keras 3 / TensorFlow."""

__version__ = "0.1.0"
