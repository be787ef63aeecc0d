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
    if path.suffix.lower() in (".h5", ".hdf5") and not path.name.endswith(".weights.h5"):
        raise ValueError(
            f"{path}: Keras's legacy HDF5 format, which tfface does not load (tfface saves models as .keras); "
            "a file saved so by an earlier tfface loads with keras.models.load_model(path, custom_objects="
            "{'GatedMultiTaskModel': tfface.models.GatedMultiTaskModel}) (or MaskGuidedMultiTaskModel): "
            "then save it as .keras"
        )
    if path.suffix != ".keras":
        raise ValueError(f"{path}: expected a .keras model file (tfface saves models as .keras)")
    if not zipfile.is_zipfile(path):  # Keras would call it "File not found"
        raise ValueError(f"{path}: not a Keras model file (a .keras file is a zip archive)")
    import keras

    from tfface.models.multitask_model import MultiTaskFaceModel  # also registers the custom classes

    try:
        model = keras.models.load_model(path)
    except (TypeError, ValueError, KeyError, OSError) as e:
        # A .keras file of another project (a custom class tfface does not
        # know) or an archive missing config.json or the weights.
        raise ValueError(f"{path}: cannot load it as a tfface model: {e}") from None
    if not isinstance(model, MultiTaskFaceModel):
        raise ValueError(
            f"{path}: a Keras {type(model).__name__}, not a tfface model (no task schema); "
            "train one with `tfface train` or tfface.models"
        )
    return model
