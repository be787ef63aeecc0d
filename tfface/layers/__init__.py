"""Custom Keras layers, each registered for `.keras` serialization."""

from tfface.layers.center_loss import CenterLoss
from tfface.layers.correlation_refinement import CorrelationRefinement
from tfface.layers.expert_routing import ExpertRouting
from tfface.layers.group_global_fusion import GroupGlobalFusion
from tfface.layers.masked_average_pooling import MaskedAveragePooling
from tfface.layers.task_gate import TaskGate
from tfface.layers.task_group_selector import TaskGroupSelector
from tfface.layers.task_heads import TaskHeads

__all__ = [
    "CenterLoss",
    "CorrelationRefinement",
    "ExpertRouting",
    "GroupGlobalFusion",
    "MaskedAveragePooling",
    "TaskGate",
    "TaskGroupSelector",
    "TaskHeads",
]
