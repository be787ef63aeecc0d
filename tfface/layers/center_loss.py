"""Center loss over per-task embeddings (Wen et al. 2016), masked for missing labels.

One center per (task, class value) in the embedding space of that task.
Pulling each task's embedding towards the center of its class value
disentangles the attribute representations (Celona et al. 2018).

The loss, `weight * 0.5 |e - stop_grad(c)|^2` averaged over the labelled
entries, moves only the embeddings. The centers are not trained by the
model's optimizer (Adam's step does not scale with a rate, and momentum
kept moving centers whose class had left the batch): like a
BatchNormalization's statistics they are updated in the training call, by
Wen et al.'s rule `c_j <- c_j - alpha * sum_{y_i = j} (c_j - e_i) / (1 + n_j)`,
so only the classes labelled in the batch move, by `update_rate` (alpha).
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfface")
class CenterLoss(keras.layers.Layer):
    """Returns the masked center loss of embeddings (B, K, D) given labels (B, K).

    Args:
        num_classes: classes per task (2 for a binary task).
        weight: lambda_C, the loss weight that moves the embeddings.
        update_rate: alpha, how fast the centers follow their class means.

    Call args:
        embeddings: (B, K, D) per-task embeddings.
        labels: (B, K) int class values; -1 marks a missing label, which
            takes no part in the loss or the center update.
    """

    def __init__(self, num_classes, weight=0.01, update_rate=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = [int(c) for c in num_classes]
        self.weight = float(weight)
        self.update_rate = float(update_rate)

    def build(self, embeddings_shape, labels_shape=None):
        num_tasks, dim = int(embeddings_shape[1]), int(embeddings_shape[2])
        if num_tasks != len(self.num_classes):
            raise ValueError(f"CenterLoss got {num_tasks} embeddings for {len(self.num_classes)} tasks")
        self.centers = self.add_weight(
            name="centers",
            shape=(num_tasks, max(self.num_classes), dim),
            initializer="zeros",
            trainable=False,  # updated in `call` (see the module docstring)
        )

    def call(self, embeddings, labels, training=None):
        labels = ops.cast(labels, "int32")
        mask = ops.cast(labels >= 0, embeddings.dtype)  # (B, K)
        safe = ops.maximum(labels, 0)
        # centers[k, labels[b, k]] for every (b, k); labelled entries only.
        onehot = ops.one_hot(safe, max(self.num_classes), dtype=embeddings.dtype) * mask[..., None]  # (B, K, C)
        centers = ops.cast(self.centers, embeddings.dtype)
        assigned = ops.einsum("bkc,kcd->bkd", onehot, centers)
        pull = ops.sum(ops.square(embeddings - ops.stop_gradient(assigned)), axis=-1)
        count = ops.maximum(ops.sum(mask), 1.0)
        if training and self.trainable:
            self._update_centers(ops.stop_gradient(embeddings), onehot)
        return 0.5 * self.weight * ops.sum(pull * mask) / count

    def _update_centers(self, embeddings, onehot):
        """Wen et al.'s step for every (task, class), 0 for a class the
        batch does not label."""
        embeddings = ops.cast(embeddings, "float32")
        onehot = ops.cast(onehot, "float32")
        counts = ops.sum(onehot, axis=0)[..., None]  # (K, C, 1)
        sums = ops.einsum("bkc,bkd->kcd", onehot, embeddings)  # (K, C, D)
        centers = ops.cast(self.centers, "float32")
        step = (counts * centers - sums) / (1.0 + counts)
        self.centers.assign(ops.cast(centers - self.update_rate * step, self.centers.dtype))

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return ()

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, weight=self.weight, update_rate=self.update_rate)
        return config
