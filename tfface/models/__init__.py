"""Models: the gated MTL-CNN and the mask-guided MGMTN, on shared backbones."""

from tfface.models.backbones import build_backbone
from tfface.models.gated_multitask_model import GatedMultiTaskModel
from tfface.models.multitask_model import MultiTaskFaceModel

__all__ = ["build_backbone", "GatedMultiTaskModel", "MultiTaskFaceModel"]
