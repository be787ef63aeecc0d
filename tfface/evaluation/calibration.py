"""Decision thresholds per binary task, tuned on held-out predictions.

A sigmoid trained on imbalanced attributes (5% Bald, 90% No_Beard) rarely
crosses 0.5 at the right place; moving each task's threshold fixes the
decision without retraining. Thresholds live in `Task.threshold`, so
`apply_thresholds` only swaps the model's schema: the `.keras` config (and
every export made from the model) carries them from then on.

Tune on validation images, never on the images you report test numbers on.
"""

from __future__ import annotations

import warnings

import numpy as np

from tfface.schema import MISSING
from tfface.schema import Schema

OBJECTIVES = ("balanced_accuracy", "precision")
# Task thresholds must lie strictly inside (0, 1).
_LOWEST, _HIGHEST = 1e-4, 1.0 - 1e-4


def _candidates(probs):
    """Midpoints between consecutive distinct probabilities, plus the
    lowest and highest thresholds allowed (about "all positive" and "all
    negative", which beat a worse-than-chance ranking): every distinct
    decision on these examples, each as far from the data as possible.

    Rounded to float32, the precision the model's outputs (and every
    comparison with a threshold in training, evaluation and export) have,
    so a candidate decides here exactly as it will there.
    """
    values = np.unique(np.asarray(probs, np.float32))
    middles = ((values[:-1].astype(np.float64) + values[1:]) / 2.0).astype(np.float32)
    # Two neighbouring float32 values have no float32 between them: then
    # the upper one separates them (decisions are p >= threshold).
    middles = np.where(middles > values[:-1], middles, values[1:])
    candidates = np.concatenate([[_LOWEST, _HIGHEST], np.clip(middles, _LOWEST, _HIGHEST)])
    return np.unique(candidates.astype(np.float32)).astype(np.float64)


def _counts(pos_sorted, neg_sorted, thresholds):
    """True positives and false positives of `p >= t` for each t."""
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = len(neg_sorted) - np.searchsorted(neg_sorted, thresholds, side="left")
    return tp, fp


def best_threshold(labels, probs, objective="balanced_accuracy", target_precision=0.9, default=0.5):
    """The threshold of one binary task, or None when no candidate fits.

    "balanced_accuracy": the candidate maximising the mean of the true
    positive and true negative rates; ties go to the one nearest `default`.
    "precision": the smallest candidate whose precision reaches
    `target_precision` (the most recall at that precision).
    """
    labels = np.asarray(labels, np.float32).reshape(-1)
    probs = np.asarray(probs, np.float32).astype(np.float64).reshape(-1)
    valid = labels != MISSING
    truth, probs = labels[valid] > 0.5, probs[valid]
    pos_sorted, neg_sorted = np.sort(probs[truth]), np.sort(probs[~truth])
    thresholds = _candidates(probs)
    if not len(thresholds) or not len(pos_sorted) or not len(neg_sorted):
        return None
    tp, fp = _counts(pos_sorted, neg_sorted, thresholds)
    if objective == "balanced_accuracy":
        score = 0.5 * (tp / len(pos_sorted) + (len(neg_sorted) - fp) / len(neg_sorted))
        best = np.flatnonzero(np.isclose(score, score.max(), rtol=0.0, atol=1e-12))
        return float(thresholds[best[np.argmin(np.abs(thresholds[best] - default))]])
    if objective == "precision":
        precision = np.divide(tp, tp + fp, out=np.zeros(len(thresholds)), where=tp > 0)
        reached = np.flatnonzero(precision >= target_precision)
        return float(thresholds[reached[0]]) if len(reached) else None
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def calibrate_thresholds(
    schema: Schema,
    labels: dict,
    probs: dict,
    objective: str = "balanced_accuracy",
    target_precision: float = 0.9,
    min_per_class: int = 5,
) -> dict:
    """Thresholds for every binary task of `schema`.

    Args:
        schema: the model's schema; its thresholds are the fallbacks.
        labels: task -> (N,) labels with -1 for missing (as from
            `tfface.evaluation.collect_predictions`).
        probs: task -> (N,) positive probabilities.
        objective: "balanced_accuracy" or "precision".
        target_precision: for "precision", in (0, 1].
        min_per_class: a task is tuned only with at least this many
            labelled positives and negatives; otherwise it keeps its
            current threshold (0.5 unless set before), as does a task
            whose target precision no threshold reaches (with a warning).

    Returns:
        task -> threshold for every binary task.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    thresholds = {}
    unreached = []
    for task in schema.binary_tasks:
        thresholds[task.name] = task.threshold
        if task.name not in labels or task.name not in probs:
            continue
        label = np.asarray(labels[task.name], np.float32).reshape(-1)
        prob = np.asarray(probs[task.name]).reshape(-1)
        if len(label) != len(prob):
            raise ValueError(f"task {task.name!r}: {len(label)} labels and {len(prob)} predictions")
        valid = label != MISSING
        positives = int(np.sum(label[valid] > 0.5))
        if min(positives, int(valid.sum()) - positives) < max(min_per_class, 1):
            continue
        threshold = best_threshold(label, prob, objective, target_precision, default=task.threshold)
        if threshold is None:
            unreached.append(task.name)
            continue
        thresholds[task.name] = threshold
    if unreached:
        warnings.warn(
            f"no threshold reaches precision {target_precision} for {unreached}; they keep their thresholds",
            stacklevel=2,
        )
    return thresholds


def apply_thresholds(model, thresholds: dict):
    """Sets the model's task thresholds in place (and returns the model).

    Updates `model.schema` (saved with the model: `get_config` writes the
    schema) and the thresholds of the training metrics, then drops the
    compiled train/test functions so the next `fit`/`evaluate` traces the
    metrics with the new thresholds.
    """
    model.schema = model.schema.with_thresholds(dict(thresholds))
    metrics = getattr(model, "attribute_metrics", None)
    if metrics is not None and hasattr(metrics, "set_thresholds"):
        metrics.set_thresholds({task.name: task.threshold for task in model.schema.binary_tasks})
        for attribute in ("train_function", "test_function"):
            if hasattr(model, attribute):
                setattr(model, attribute, None)
    return model


def calibrate_model(model, sources, objective="balanced_accuracy", target_precision=0.9, batch_size=64, min_per_class=5):
    """Predicts on `sources` (validation data), tunes and applies the
    thresholds; returns them. Save the model afterwards to keep them."""
    from tfface.evaluation.evaluate import collect_predictions

    labels, probs, _ = collect_predictions(model, sources, batch_size=batch_size, keep_faces=0)
    thresholds = calibrate_thresholds(model.schema, labels, probs, objective, target_precision, min_per_class)
    apply_thresholds(model, thresholds)
    return thresholds
