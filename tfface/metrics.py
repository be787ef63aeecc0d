"""Masked multi-task metrics, computed only on labelled entries.

`MultiTaskMetrics` is one Keras metric over all tasks so that Keras (and
KerasTuner) read its results by name: `mean_accuracy` and
`mean_balanced_accuracy` over the binary tasks that have labels, and
`<task>_accuracy` for each multiclass task (plus `age_group_one_off`).
"""

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="tfface")
class MultiTaskMetrics(keras.metrics.Metric):
    """Accumulates confusion counts per task over an epoch.

    With no labelled binary task the means read 0 (a checkpoint monitoring
    them needs a number), where `evaluate`'s metrics.json says null. A
    multiclass task no example labels reads NaN, not 0: it was not scored
    (a CelebA-only source labels no age group), not always wrong.

    Args:
        task_specs: list of (name, num_classes, threshold, kind) per task,
            kind "binary" or "multiclass" as in the schema; binary tasks use
            `threshold`. Without a kind, num_classes == 2 means binary.
    """

    def __init__(self, task_specs, name="multitask_metrics", **kwargs):
        super().__init__(name=name, **kwargs)
        specs = []
        for spec in task_specs:
            task, classes, threshold = str(spec[0]), int(spec[1]), float(spec[2])
            kind = str(spec[3]) if len(spec) > 3 else ("binary" if classes == 2 else "multiclass")
            specs.append((task, classes, threshold, kind))
        self.task_specs = specs
        nb, nm = max(len(self.binary), 1), max(len(self.multiclass), 1)
        self.counts = self.add_variable(shape=(nb, 4), initializer="zeros", name="binary_counts")
        self.class_counts = self.add_variable(shape=(nm, 3), initializer="zeros", name="multiclass_counts")

    def set_thresholds(self, thresholds: dict):
        """Moves the decision thresholds of binary tasks (task -> value)."""
        self.task_specs = [
            (n, c, float(thresholds.get(n, t)) if kind == "binary" else t, kind) for n, c, t, kind in self.task_specs
        ]

    # By the schema's kind, as `evaluate` counts them: a two-class multiclass
    # task is scored by its exact accuracy, not in the means.
    @property
    def binary(self):
        """(name, threshold) of each binary task."""
        return [(n, t) for n, _, t, kind in self.task_specs if kind == "binary"]

    @property
    def multiclass(self):
        """(name, num_classes) of each multiclass task."""
        return [(n, c) for n, c, _, kind in self.task_specs if kind != "binary"]

    def update_state(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:  # rather than counting every image once without a word
            raise ValueError(
                "MultiTaskMetrics takes no sample_weight: it counts every labelled image once (-1 marks a missing label)"
            )
        labelled = [y_true[name] for name, _ in self.binary if name in y_true]
        if labelled:
            # All binary tasks as columns of one (B, N) matrix: a chain of
            # ops per task made the step's graph grow with the attributes.
            # A task the labels leave out is all -1: counted nowhere.
            missing = ops.full(ops.shape(ops.reshape(labelled[0], (-1,))), -1.0)
            label = ops.stack(
                [ops.cast(ops.reshape(y_true[name], (-1,)), "float32") if name in y_true else missing for name, _ in self.binary],
                axis=1,
            )
            prob = ops.stack([ops.cast(ops.reshape(y_pred[name], (-1,)), "float32") for name, _ in self.binary], axis=1)
            pred = ops.cast(prob >= ops.convert_to_tensor([t for _, t in self.binary], "float32"), "float32")
            valid = ops.cast(label >= 0, "float32")
            pos = ops.cast(label > 0.5, "float32") * valid
            neg = ops.cast(label < 0.5, "float32") * valid
            counts = [pos * pred, pos, neg * (1.0 - pred), neg]
            self.counts.assign_add(ops.stack([ops.sum(c, axis=0) for c in counts], axis=1))
        rows = []
        for name, _ in self.multiclass:
            if name not in y_true:
                rows.append(ops.zeros((3,)))
                continue
            label = ops.cast(ops.reshape(y_true[name], (-1,)), "int32")
            pred = ops.cast(ops.argmax(y_pred[name], axis=-1), "int32")
            valid = ops.cast(label >= 0, "float32")
            exact = ops.cast(ops.equal(pred, label), "float32") * valid
            near = ops.cast(ops.abs(pred - label) <= 1, "float32") * valid
            rows.append(ops.stack([ops.sum(exact), ops.sum(near), ops.sum(valid)]))
        if self.multiclass:
            self.class_counts.assign_add(ops.stack(rows))

    def result(self):
        results = {}
        if self.binary:
            tp, pos, tn, neg = (self.counts[:, i] for i in range(4))
            labelled = ops.cast(pos + neg > 0, "float32")
            n_tasks = ops.maximum(ops.sum(labelled), 1.0)
            accuracy = (tp + tn) / ops.maximum(pos + neg, 1.0)
            # Balanced accuracy averages the recall of the classes present.
            tpr, tnr = tp / ops.maximum(pos, 1.0), tn / ops.maximum(neg, 1.0)
            has_pos, has_neg = ops.cast(pos > 0, "float32"), ops.cast(neg > 0, "float32")
            balanced = (tpr * has_pos + tnr * has_neg) / ops.maximum(has_pos + has_neg, 1.0)
            results["mean_accuracy"] = ops.sum(accuracy * labelled) / n_tasks
            results["mean_balanced_accuracy"] = ops.sum(balanced * labelled) / n_tasks
        for i, (name, _) in enumerate(self.multiclass):
            exact, near, total = (self.class_counts[i, j] for j in range(3))
            scored = total > 0
            results[f"{name}_accuracy"] = ops.where(scored, exact / ops.maximum(total, 1.0), float("nan"))
            if name == "age_group":
                results["age_group_one_off"] = ops.where(scored, near / ops.maximum(total, 1.0), float("nan"))
        return results

    def reset_state(self):
        # zeros_like(variable) fails on JAX: build from shape and dtype.
        self.counts.assign(ops.zeros(self.counts.shape, self.counts.dtype))
        self.class_counts.assign(ops.zeros(self.class_counts.shape, self.class_counts.dtype))

    def get_config(self):
        return {**super().get_config(), "task_specs": self.task_specs}


def balanced_accuracy(labels, predictions, threshold=0.5):
    """Numpy balanced accuracy of one binary task over labelled entries
    (positive where the probability is >= `threshold`, as the metric)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    valid = labels >= 0
    labels, predictions = labels[valid] > 0.5, predictions[valid] >= threshold
    recalls = [np.mean(predictions[labels == v] == v) for v in (True, False) if np.any(labels == v)]
    return float(np.mean(recalls)) if recalls else float("nan")
