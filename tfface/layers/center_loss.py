"""Center loss over per-task embeddings (Wen et al. 2016), masked for missing labels.

One center per (task, class value) in the embedding space of that task.
Pulling each task's embedding towards the center of its class value
disentangles the attribute representations (Celona et al. 2018).

The center update of Wen et al. (c <- c - alpha * dc) is done without a
custom optimizer, so it runs on every backend: the loss splits into
`weight * 0.5 |e - stop_grad(c)|^2` (moves embeddings) and
`update_rate * 0.5 |stop_grad(e) - c|^2` (moves the centers).
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
        )

    def call(self, embeddings, labels):
        labels = ops.cast(labels, "int32")
        mask = ops.cast(labels >= 0, embeddings.dtype)  # (B, K)
        safe = ops.maximum(labels, 0)
        # centers[k, labels[b, k]] for every (b, k).
        onehot = ops.one_hot(safe, max(self.num_classes), dtype=embeddings.dtype)  # (B, K, C)
        centers = ops.einsum("bkc,kcd->bkd", onehot, ops.cast(self.centers, embeddings.dtype))
        pull = ops.sum(ops.square(embeddings - ops.stop_gradient(centers)), axis=-1)
        follow = ops.sum(ops.square(ops.stop_gradient(embeddings) - centers), axis=-1)
        count = ops.maximum(ops.sum(mask), 1.0)
        per_entry = self.weight * pull + self.update_rate * follow
        return 0.5 * ops.sum(per_entry * mask) / count

    def compute_output_shape(self, embeddings_shape, labels_shape=None):
        return ()

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, weight=self.weight, update_rate=self.update_rate)
        return config
