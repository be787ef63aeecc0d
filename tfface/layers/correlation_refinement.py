"""Post-processing that refines each task's logits from the other tasks.

Celona et al. 2018 condition predictions on attribute correlations (MCNN-AUX
is the nearest published design). Here: z' = z + C (s - s_bar), where s are
the tasks' probabilities, s_bar their running mean, and C is learnable with
each task's own block masked out. C starts at zero, so the layer starts as
the identity; `set_from_label_correlation` can start it from label
co-occurrence instead.
"""

import keras
import numpy as np
from keras import ops


def _blocks(output_sizes):
    starts = np.cumsum([0] + list(output_sizes))
    return [(int(starts[i]), int(starts[i + 1])) for i in range(len(output_sizes))]


def _segments(output_sizes):
    """(start, end, binary) spans: each run of binary tasks, each multiclass task."""
    segments = []
    for (start, end), size in zip(_blocks(output_sizes), output_sizes):
        if size == 1 and segments and segments[-1][2]:
            segments[-1] = (segments[-1][0], end, True)
        else:
            segments.append((start, end, size == 1))
    return segments


@keras.saving.register_keras_serializable(package="tfface")
class CorrelationRefinement(keras.layers.Layer):
    """Refines logits (B, M) with the other tasks' probabilities.

    Args:
        output_sizes: logits per task, as in `TaskHeads` (1 = binary task
            with a sigmoid, C > 1 = softmax over C classes).
        momentum: momentum of the running mean of the probabilities.
    """

    def __init__(self, output_sizes, momentum=0.99, **kwargs):
        super().__init__(**kwargs)
        self.output_sizes = [int(s) for s in output_sizes]
        self.momentum = float(momentum)
        size = sum(self.output_sizes)
        mask = np.ones((size, size), np.float32)
        for start, end in _blocks(self.output_sizes):
            mask[start:end, start:end] = 0.0
        self._off_block_mask = mask

    def build(self, input_shape):
        size = sum(self.output_sizes)
        if int(input_shape[-1]) != size:
            raise ValueError(f"CorrelationRefinement expects {size} logits, got {input_shape[-1]}")
        self.correlation = self.add_weight(name="correlation", shape=(size, size), initializer="zeros")
        self.moving_mean = self.add_weight(
            name="moving_mean",
            shape=(size,),
            initializer=keras.initializers.Constant(0.5),
            trainable=False,
            autocast=False,  # a float32 running mean, also under mixed precision
        )

    def probabilities(self, logits):
        # Runs of consecutive binary tasks share one sigmoid: one op per
        # task would cost more than the matmul on a small CPU model.
        parts = []
        for start, end, binary in _segments(self.output_sizes):
            block = logits[:, start:end]
            parts.append(ops.sigmoid(block) if binary else ops.softmax(block, axis=-1))
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)

    def call(self, logits, training=False):
        probs = self.probabilities(logits)
        if training and self.trainable:  # frozen, it keeps its statistics (as BatchNormalization does)
            batch_mean = ops.mean(ops.stop_gradient(probs), axis=0)
            self.moving_mean.assign(
                self.momentum * self.moving_mean + (1.0 - self.momentum) * ops.cast(batch_mean, "float32")
            )
        centered = probs - ops.cast(self.moving_mean, probs.dtype)
        weights = ops.cast(self.correlation * self._off_block_mask, logits.dtype)
        # Row i of `weights` says how much each other output moves output i.
        return logits + ops.matmul(centered, ops.transpose(weights))

    def set_from_label_correlation(self, labels, scale=0.1):
        """Starts C from label co-occurrence (phi coefficients of binary tasks).

        Args:
            labels: (N, M) array in the logit layout with NaN where missing
                (only binary tasks are used; pairs need co-labelled rows).
        """
        labels = np.asarray(labels, np.float64)
        size = labels.shape[1]
        binary = [start for (start, end) in _blocks(self.output_sizes) if end - start == 1]
        matrix = np.zeros((size, size), np.float32)
        for i in binary:
            for j in binary:
                if i == j:
                    continue
                both = ~np.isnan(labels[:, i]) & ~np.isnan(labels[:, j])
                if both.sum() < 10:
                    continue
                a, b = labels[both, i], labels[both, j]
                if a.std() == 0 or b.std() == 0:
                    continue
                matrix[i, j] = np.corrcoef(a, b)[0, 1]
        self.correlation.assign(scale * matrix * self._off_block_mask)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(output_sizes=self.output_sizes, momentum=self.momentum)
        return config
