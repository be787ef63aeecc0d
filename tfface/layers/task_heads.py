"""One linear head per task over per-task embeddings, as one batched op."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfface")
class TaskHeads(keras.layers.Layer):
    """Per-task linear heads: embeddings (B, K, D) -> logits (B, M).

    Task k has `output_sizes[k]` logits (1 for a binary task, C for a
    C-class task); the output concatenates them in task order, so
    M = sum(output_sizes). All heads run as one einsum over a padded kernel,
    which keeps the cost of 40+ heads at one op.

    Args:
        output_sizes: logits per task.
    """

    def __init__(self, output_sizes, **kwargs):
        super().__init__(**kwargs)
        self.output_sizes = [int(s) for s in output_sizes]
        self._gather = [
            k * max(self.output_sizes) + c
            for k, size in enumerate(self.output_sizes)
            for c in range(size)
        ]

    def build(self, input_shape):
        num_tasks, dim = int(input_shape[1]), int(input_shape[2])
        if num_tasks != len(self.output_sizes):
            raise ValueError(f"TaskHeads got {num_tasks} embeddings for {len(self.output_sizes)} tasks")
        width = max(self.output_sizes)
        self.kernel = self.add_weight(
            name="kernel", shape=(num_tasks, dim, width), initializer="glorot_uniform"
        )
        self.bias = self.add_weight(name="bias", shape=(num_tasks, width), initializer="zeros")

    def call(self, embeddings):
        logits = ops.einsum("bkd,kdc->bkc", embeddings, ops.cast(self.kernel, embeddings.dtype))
        logits = logits + ops.cast(self.bias, embeddings.dtype)
        flat = ops.reshape(logits, (ops.shape(logits)[0], -1))
        return ops.take(flat, self._gather, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], sum(self.output_sizes))

    def get_config(self):
        config = super().get_config()
        config.update(output_sizes=self.output_sizes)
        return config
