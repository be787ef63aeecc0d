"""One linear head per task over per-task embeddings, as one batched op."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfface")
class TaskHeads(keras.layers.Layer):
    """Per-task linear heads: embeddings (B, K, D) -> logits (B, M).

    Task k has `output_sizes[k]` logits (1 for a binary task, C for a
    C-class task); the output concatenates them in task order, so
    M = sum(output_sizes). The kernel is stored padded to the widest task,
    (K, D, max size). Every task's first logit comes from one multiply and
    sum over (B, K, D); only multiclass tasks add a small matmul each. On a
    2-core CPU that measured a few times faster than one batched einsum
    over the padded kernel, which TF runs as transposes and a batch matmul.

    Args:
        output_sizes: logits per task.
    """

    def __init__(self, output_sizes, **kwargs):
        super().__init__(**kwargs)
        self.output_sizes = [int(s) for s in output_sizes]

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
        kernel = ops.cast(self.kernel, embeddings.dtype)
        bias = ops.cast(self.bias, embeddings.dtype)
        # (B, K): logit 0 of every task; all a binary task has.
        first = ops.sum(embeddings * kernel[:, :, 0], axis=-1) + bias[:, 0]
        parts, run_start = [], None
        for k, size in enumerate(self.output_sizes):
            if size == 1:
                run_start = k if run_start is None else run_start
                continue
            if run_start is not None:
                parts.append(first[:, run_start:k])
                run_start = None
            parts.append(ops.matmul(embeddings[:, k, :], kernel[k, :, :size]) + bias[k, :size])
        if run_start is not None:
            parts.append(first[:, run_start:])
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], sum(self.output_sizes))

    def get_config(self):
        config = super().get_config()
        config.update(output_sizes=self.output_sizes)
        return config
