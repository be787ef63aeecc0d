"""SavedModel export for TF Serving (see `tfface.export.saved_model`)."""

from tfface.export.saved_model import (
    ExportError,
    export_saved_model,
    list_versions,
    load_exported,
    load_model_info,
    resolve_version_dir,
)

__all__ = [
    "ExportError",
    "export_saved_model",
    "list_versions",
    "load_exported",
    "load_model_info",
    "resolve_version_dir",
]
