"""Hands each task the feature of its facial-part group (MGMTN heads).

The fused features are one row per group (eyes, nose, mouth, ...); every
attribute head reads its own group's row, so the heads stay one batched
layer over tasks. A layer rather than a Lambda so a saved model needs no
pickled Python closure.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfface")
class TaskGroupSelector(keras.layers.Layer):
    """(B, G, D) -> (B, K, D): row `task_groups[k]` for task k.

    Args:
        task_groups: the group index of each task, in task order.
    """

    def __init__(self, task_groups, **kwargs):
        super().__init__(**kwargs)
        self.task_groups = [int(g) for g in task_groups]
        if not self.task_groups or min(self.task_groups) < 0:
            raise ValueError(f"task_groups must be non-empty group indices, got {task_groups!r}")

    def build(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"TaskGroupSelector needs group features (B, G, D), got {tuple(input_shape)}")
        groups = input_shape[1]
        if groups is not None and max(self.task_groups) >= groups:
            raise ValueError(f"task_groups {self.task_groups} index past the {groups} groups of the features")

    def call(self, group_features):
        return ops.take(group_features, self.task_groups, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], len(self.task_groups), input_shape[2])

    def get_config(self):
        return {**super().get_config(), "task_groups": list(self.task_groups)}
