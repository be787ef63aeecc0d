"""Loading saved tfface models: the one place that knows the file layout."""

from pathlib import Path


def load_model(path):
    """Loads a `.keras` tfface model (a run folder means its `model.keras`)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model.keras").is_file():
        path = path / "model.keras"
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    if path.suffix != ".keras":
        raise ValueError(f"{path}: expected a .keras model file (tfface saves models as .keras)")
    import keras

    import tfface.models  # noqa: F401  (registers the custom classes)

    return keras.models.load_model(path)
