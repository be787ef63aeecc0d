"""Models: the gated MTL-CNN and the mask-guided MGMTN, on shared backbones."""

from tfface.models.backbones import build_backbone
from tfface.models.gated_multitask_model import GatedMultiTaskModel
from tfface.models.mask_guided_model import MaskGuidedMultiTaskModel
from tfface.models.mask_guided_model import landmark_mask_variant
from tfface.models.mask_predictor import build_mask_predictor
from tfface.models.mask_predictor import pretrain_mask_predictor
from tfface.models.multitask_model import MultiTaskFaceModel

__all__ = [
    "build_backbone",
    "build_mask_predictor",
    "GatedMultiTaskModel",
    "landmark_mask_variant",
    "MaskGuidedMultiTaskModel",
    "MultiTaskFaceModel",
    "pretrain_mask_predictor",
]
