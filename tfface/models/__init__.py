"""Models: the gated MTL-CNN and the mask-guided MGMTN, on shared backbones."""

from tfface.models.backbones import build_backbone
from tfface.models.build import build_model
from tfface.models.gated_multitask_model import GatedMultiTaskModel
from tfface.models.mask_guided_model import MaskGuidedMultiTaskModel
from tfface.models.mask_guided_model import landmark_mask_variant
from tfface.models.mask_predictor import build_mask_predictor
from tfface.models.mask_predictor import pretrain_mask_predictor
from tfface.models.multitask_model import MultiTaskFaceModel
from tfface.models.saving import load_model
from tfface.presets import MODEL_PRESETS
from tfface.presets import from_preset
from tfface.presets import list_presets
from tfface.presets import preset_config

__all__ = [
    "build_backbone",
    "build_model",
    "from_preset",
    "list_presets",
    "MODEL_PRESETS",
    "preset_config",
    "build_mask_predictor",
    "GatedMultiTaskModel",
    "landmark_mask_variant",
    "load_model",
    "MaskGuidedMultiTaskModel",
    "MultiTaskFaceModel",
    "pretrain_mask_predictor",
]
