"""Loading saved tfface models: the one place that knows the file layout."""

import zipfile
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
    if not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise ValueError(f"{path}: not a Keras model file (a .keras file is a zip archive)")
    import keras

    from tfface.models.multitask_model import MultiTaskFaceModel  # also registers the custom classes

    model = keras.models.load_model(path)
    if not isinstance(model, MultiTaskFaceModel):
        raise ValueError(
            f"{path}: a Keras {type(model).__name__}, not a tfface model (no task schema); "
            "train one with `tfface train` or tfface.models"
        )
    return model
