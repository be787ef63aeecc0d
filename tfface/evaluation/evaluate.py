"""Evaluation of a trained model on labelled face data.

One pass over the data collects every task's probabilities
(`collect_predictions`); everything else is NumPy on those arrays, so the
same numbers come out whether the model ran here or predictions were
stored: per-task and headline metrics (`compute_metrics`), accuracy by
gender, age group and race (`subgroup_metrics`), and `evaluate_model`, which
also writes `metrics.json`, PNG plots, `report.md` and `model_card.md` to a folder.

Metrics only count labelled entries (-1 is missing). Binary decisions are
`probability >= threshold` with each task's threshold from the schema
(`tfface.evaluation.calibration` tunes them), as in training metrics.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from tfface.atomic_files import check_output_folder
from tfface.atomic_files import replaced_folder
from tfface.data.source import FaceSource
from tfface.models.saving import load_model
from tfface.schema import MISSING
from tfface.schema import Schema

# Faces kept for the predicted-mask picture of mask-guided models.
MASK_PICTURE_FACES = 8
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
MODEL_CARD_FILE = "model_card.md"

# Subgroupings of the subgroup table: name -> tasks that label it, first
# labelled one wins (CelebA-schema models call gender "Male").
SUBGROUPINGS = {
    "gender": ("gender", "Male"),
    "age_group": ("age_group",),
    "race": ("race",),
}
GENDER_NAMES = ("female", "male")
# Seed of the hash that picks the images of a limited evaluation (`limit`).
# Not the split seed: with it, the images without an identity that rank
# first would be the very ones a split puts in validation, so "--limit" on
# all of the data would score mostly held-out images.
LIMIT_SEED = 20240602


# --- loading --------------------------------------------------------------------


def open_sources(specs, image_size=None, split=None, val_fraction=0.15, split_seed=None) -> list:
    """Data specs (folders, "synthetic:N", named sources, `FaceSource`s) -> sources.

    Args:
        specs: one spec or a list of them.
        image_size: image size for generated (synthetic) sources.
        split: None (every image), "train" or "val": the same identity-
            disjoint split `tfface.training` makes with `val_fraction` and
            `split_seed`, so "val" evaluates on images the model did not
            train on.
    """
    if isinstance(specs, (str, os.PathLike, FaceSource)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise ValueError("no data to evaluate on: give at least one source")
    sources = []
    for spec in specs:
        if isinstance(spec, FaceSource):
            source = spec
        else:
            from tfface.data.sources import open_source

            kwargs = {"image_size": int(image_size)} if image_size else {}
            source = open_source(spec, **kwargs)
        if split is not None:
            source = _split(source, split, val_fraction, split_seed)
        sources.append(source)
    return sources


def _split(source, split, val_fraction, split_seed):
    from tfface.data.splits import DEFAULT_SEED
    from tfface.data.splits import split_source

    if split not in ("train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1) to take a split, got {val_fraction}")
    seed = DEFAULT_SEED if split_seed is None else split_seed
    part = split_source(source, val_fraction=val_fraction, seed=seed)[split]
    if len(part) == 0:
        raise ValueError(f"source {source.name!r} ({len(source)} images) has no {split!r} images")
    return part


def _check_limit(limit) -> None:
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"limit must be a whole number >= 1, got {limit!r}")


def limit_sources(sources, limit: int, seed: int = LIMIT_SEED):
    """A fixed subset of `limit` images of the sources, together.

    Each image is ranked by `tfface.data.splits.image_draws`: a seeded hash
    of its file name (of its pixels for images in memory), so the same data
    gives the same images on every run and machine, none is chosen for its
    place in the file (CelebA's rows are in id order), and adding or
    removing other images does not swap the chosen ones for others. Rows
    keep their order within each source.

    Returns:
        (sources, available, record): the sources cut to their chosen rows
        (a source with none chosen is left out), the number of images each
        of those had before the cut, and what `metrics.json` records under
        "limit".
    """
    from tfface.data.splits import image_draws

    _check_limit(limit)
    total = sum(len(s) for s in sources)
    record = {
        "requested": int(limit),
        "applied": bool(limit < total),
        "n_images_scored": int(min(limit, total)),
        "n_images_available": int(total),
        "seed": int(seed),
        "chosen_by": "the lowest seeded hashes of the image file names (of the pixels for images in memory)",
    }
    if limit >= total:
        return list(sources), [len(s) for s in sources], record
    draws = np.concatenate([image_draws(s, np.arange(len(s)), seed) for s in sources])
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(sources)])
    rows = np.concatenate([np.arange(len(s)) for s in sources])
    chosen = np.argsort(draws, kind="stable")[: int(limit)]
    limited, available = [], []
    for i, source in enumerate(sources):
        mine = np.sort(rows[chosen[owner[chosen] == i]])
        if mine.size:
            limited.append(source.subset(mine))
            available.append(len(source))
    return limited, available, record


# --- predictions ------------------------------------------------------------------


def _takes_landmark_masks(model) -> bool:
    config = getattr(model, "model_config", None)
    return bool(getattr(config, "use_landmark_masks", False))


def collect_predictions(model, sources, batch_size=64, keep_faces=MASK_PICTURE_FACES):
    """Runs the model once over the sources, in order.

    Returns:
        (labels, probs, extras): `labels` task -> (N,) array with -1 where
        missing; `probs` task -> (N,) positive probability (binary) or
        (N, C) class probabilities; `extras` with "_source" (N,) source
        index, and for models that output `_group_masks` the first
        `keep_faces` "images" (uint8) and their predicted "_group_masks".
    """
    from tfface.data.pipeline import make_dataset

    if isinstance(sources, FaceSource):
        sources = [sources]
    schema = model.schema
    needs_masks = _takes_landmark_masks(model)
    dataset = make_dataset(
        list(sources),
        schema,
        model.image_size,
        batch_size=batch_size,
        with_masks=needs_masks,
        cache=False,
    )
    labels = {t.name: [] for t in schema}
    probs = {t.name: [] for t in schema}
    source_ids, images, masks = [], [], []
    kept = 0
    for x, y in dataset:
        inputs = {"image": x["image"]}
        if needs_masks:
            inputs["group_masks"] = y["_group_masks"]
        outputs = model.predict_on_batch(inputs)
        for task in schema:
            if task.name not in outputs:
                raise ValueError(f"the model has no output for task {task.name!r} of its schema")
            labels[task.name].append(np.asarray(y[task.name]))
            probs[task.name].append(np.asarray(outputs[task.name], np.float32))
        source_ids.append(np.asarray(y["_source"]))
        if "_group_masks" in outputs and kept < keep_faces:
            take = keep_faces - kept
            images.append(np.clip(np.round(np.asarray(x["image"][:take])), 0, 255).astype(np.uint8))
            masks.append(np.asarray(outputs["_group_masks"][:take], np.float32))
            kept += len(images[-1])
    labels = {k: np.concatenate(v) for k, v in labels.items()}
    probs = {k: np.concatenate(v) for k, v in probs.items()}
    extras = {"_source": np.concatenate(source_ids).astype(np.int32)}
    if images:
        extras["images"] = np.concatenate(images)
        extras["_group_masks"] = np.concatenate(masks)
    return labels, probs, extras


# --- metrics ------------------------------------------------------------------------


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def binary_scores(labels, probs, threshold=0.5) -> dict:
    """Scores of one binary task over its labelled entries.

    Balanced accuracy is the mean recall of the classes present (so a
    subgroup with one class present scores that class's recall).
    """
    labels = np.asarray(labels, np.float32).reshape(-1)
    probs = np.asarray(probs, np.float32).reshape(-1)
    valid = labels != MISSING
    truth = labels[valid] > 0.5
    predicted = probs[valid] >= threshold
    n = int(truth.size)
    positives = int(truth.sum())
    negatives = n - positives
    tp = int(np.sum(truth & predicted))
    tn = int(np.sum(~truth & ~predicted))
    tpr = tp / positives if positives else None
    tnr = tn / negatives if negatives else None
    return {
        "n_labelled": n,
        "positives": positives,
        "positive_rate": positives / n if n else None,
        "predicted_positive_rate": float(predicted.mean()) if n else None,
        "accuracy": (tp + tn) / n if n else None,
        "balanced_accuracy": _mean_or_none([tpr, tnr]),
        "true_positive_rate": tpr,
        "true_negative_rate": tnr,
        "threshold": float(threshold),
    }


def multiclass_scores(labels, probs, num_classes, one_off=False) -> dict:
    """Exact accuracy, mean per-class recall and the confusion matrix
    (rows: true class, columns: predicted); `one_off` adds the share
    predicted within one class of the truth (ordered classes, e.g. age)."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, np.float32).reshape(len(labels), -1)
    valid = labels != MISSING
    truth = labels[valid]
    predicted = np.argmax(probs[valid], axis=-1)
    n = int(truth.size)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    support = confusion.sum(axis=1)
    recalls = [confusion[c, c] / support[c] for c in range(num_classes) if support[c]]
    scores = {
        "n_labelled": n,
        "accuracy": float(np.mean(truth == predicted)) if n else None,
        "balanced_accuracy": _mean_or_none(recalls),
        "class_counts": support.tolist(),
        "confusion": confusion.tolist(),
    }
    if one_off:
        scores["exact"] = scores["accuracy"]
        scores["one_off"] = float(np.mean(np.abs(truth - predicted) <= 1)) if n else None
    return scores


def _check_arrays(schema, labels, probs):
    n = None
    for task in schema:
        if task.name not in labels or task.name not in probs:
            continue
        label, prob = np.asarray(labels[task.name]), np.asarray(probs[task.name])
        not_finite = int(np.sum(~np.isfinite(prob).reshape(len(prob), -1).all(axis=1))) if prob.size else 0
        if not_finite:
            # NaN compares as "negative" and argmax picks class 0: plausible
            # numbers from a model that diverged.
            raise ValueError(
                f"task {task.name!r}: the model gave NaN or infinite probabilities for {not_finite} of "
                f"{len(prob)} images (a model whose training diverged?); no metrics are computed from them"
            )
        if n is None:
            n = len(label)
        if len(label) != n or len(prob) != n:
            raise ValueError(
                f"task {task.name!r}: {len(label)} labels and {len(prob)} predictions, expected {n}"
            )
        if not task.is_binary and (prob.ndim != 2 or prob.shape[1] != task.num_classes):
            raise ValueError(
                f"task {task.name!r}: predictions must have shape (N, {task.num_classes}), got {prob.shape}"
            )
    return n or 0


def is_labelled(labels, name) -> bool:
    return name in labels and bool(np.any(np.asarray(labels[name]) != MISSING))


def compute_metrics(schema: Schema, labels: dict, probs: dict, thresholds: dict | None = None) -> dict:
    """Per-task and headline metrics over the labelled entries.

    Args:
        schema: the model's schema (task kinds, classes, thresholds).
        labels: task -> (N,) labels, -1 where missing.
        probs: task -> (N,) positive probabilities or (N, C) probabilities.
        thresholds: task -> threshold, overriding the schema's.

    Returns:
        {"n_images", "mean_accuracy", "mean_balanced_accuracy" (means over
        the binary tasks the data labels; None if it labels none),
        "n_binary_tasks", "tasks": {task: scores}} plus, where labelled,
        "gender_accuracy", "age_group_exact", "age_group_one_off",
        "race_accuracy".
    """
    thresholds = dict(thresholds or {})
    unknown = sorted(set(thresholds) - set(schema.task_names))
    if unknown:
        raise ValueError(f"thresholds given for tasks not in the schema: {unknown}")
    n_images = _check_arrays(schema, labels, probs)
    tasks = {}
    for task in schema:
        if not is_labelled(labels, task.name) or task.name not in probs:
            continue
        if task.is_binary:
            threshold = thresholds.get(task.name, task.threshold)
            scores = binary_scores(labels[task.name], probs[task.name], threshold)
        else:
            scores = multiclass_scores(
                labels[task.name], probs[task.name], task.num_classes, one_off=task.name == "age_group"
            )
        tasks[task.name] = {"kind": task.kind, "group": task.group, **scores}
    binary = [tasks[t.name] for t in schema.binary_tasks if t.name in tasks]
    metrics = {
        "n_images": int(n_images),
        "mean_accuracy": _mean_or_none([s["accuracy"] for s in binary]),
        "mean_balanced_accuracy": _mean_or_none([s["balanced_accuracy"] for s in binary]),
        "n_binary_tasks": len(binary),
    }
    for name in SUBGROUPINGS["gender"]:
        if name in tasks:
            metrics["gender_accuracy"] = tasks[name]["accuracy"]
            metrics["gender_balanced_accuracy"] = tasks[name]["balanced_accuracy"]
            break
    if "age_group" in tasks:
        metrics["age_group_exact"] = tasks["age_group"]["exact"]
        metrics["age_group_one_off"] = tasks["age_group"]["one_off"]
    if "race" in tasks:
        metrics["race_accuracy"] = tasks["race"]["accuracy"]
    metrics["tasks"] = tasks
    return metrics


def _subgroup_labels(schema, labels):
    """(subgrouping, task name, group names) for each labelled subgrouping."""
    found = []
    for by, candidates in SUBGROUPINGS.items():
        for name in candidates:
            if name in schema and is_labelled(labels, name):
                task = schema[name]
                names = GENDER_NAMES if by == "gender" else task.classes
                found.append((by, name, tuple(names)))
                break
    return found


def subgroup_metrics(schema: Schema, labels: dict, probs: dict, thresholds: dict | None = None) -> list:
    """Accuracy of each binary attribute by gender, age group and race.

    Subgroups come from the *true* labels of "gender" (or CelebA's
    "Male"), "age_group" and "race", where the data labels them. An
    attribute is not split by itself. Only examples labelled for both the
    attribute and the subgrouping count, so within one (attribute,
    subgrouping) the rows' `n` add up to that number.

    Returns:
        A list of rows {"attribute", "by", "subgroup", "n", "positives",
        "accuracy", "balanced_accuracy"}; empty subgroups are left out.
    """
    thresholds = dict(thresholds or {})
    _check_arrays(schema, labels, probs)
    rows = []
    for by, group_task, group_names in _subgroup_labels(schema, labels):
        group_labels = np.asarray(labels[group_task]).reshape(-1).astype(np.int64)
        for task in schema.binary_tasks:
            if task.name == group_task or not is_labelled(labels, task.name) or task.name not in probs:
                continue
            label = np.asarray(labels[task.name], np.float32).reshape(-1)
            prob = np.asarray(probs[task.name], np.float32).reshape(-1)
            threshold = thresholds.get(task.name, task.threshold)
            for g, group_name in enumerate(group_names):
                member = (group_labels == g) & (label != MISSING)
                if not member.any():
                    continue
                scores = binary_scores(label[member], prob[member], threshold)
                rows.append(
                    {
                        "attribute": task.name,
                        "by": by,
                        "subgroup": group_name,
                        "n": scores["n_labelled"],
                        "positives": scores["positives"],
                        "accuracy": scores["accuracy"],
                        "balanced_accuracy": scores["balanced_accuracy"],
                    }
                )
    return rows


def _headline(metrics):
    keys = (
        "n_images",
        "mean_accuracy",
        "mean_balanced_accuracy",
        "n_binary_tasks",
        "gender_accuracy",
        "age_group_exact",
        "age_group_one_off",
        "race_accuracy",
    )
    return {k: metrics[k] for k in keys if k in metrics}


# --- writing ------------------------------------------------------------------------------


def _plain(value):
    """NumPy scalars to Python, NaN to None: strict JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_model(
    model_path_or_model,
    data_spec_or_sources,
    out_dir,
    batch_size: int = 64,
    thresholds: dict | None = None,
    split: str | None = None,
    val_fraction: float = 0.15,
    split_seed: int | None = None,
    model_path: str | None = None,
    limit: int | None = None,
    skip_bad_images: bool = False,
) -> dict:
    """Evaluates a model and writes `metrics.json`, PNG plots and `report.md`.

    Args:
        model_path_or_model: a `.keras` file, a run folder holding
            `model.keras`, or a loaded tfface model.
        data_spec_or_sources: a folder, "synthetic:N", a named source
            ("celeba_sample", "utkface", ...), a `FaceSource`, or a list.
        out_dir: output folder, written whole: the files go to a new
            folder beside it that replaces an earlier evaluation only when
            complete. A folder holding anything but evaluation files is
            refused before any work.
        batch_size: prediction batch size.
        thresholds: task -> threshold overriding the model's.
        split: None, "train" or "val" (see `open_sources`).
        model_path: where a loaded model came from (recorded in
            `metrics.json` and read by the model card).
        limit: score only this many images of the (split) data, a fixed
            subset chosen by a hash of each image's file name (see
            `limit_sources`); all of them when there are no more. `n_images`
            stays the number scored; "limit" in `metrics.json` records the
            request and how many images there were (None: no limit).
        skip_bad_images: leave out the images that do not decode (after
            the split and the limit; listed under the source's `problems`)
            instead of stopping at them.

    Returns:
        The metrics dict also saved as `metrics.json`.
    """
    check_evaluation_folder(out_dir)
    if isinstance(model_path_or_model, (str, os.PathLike)):
        model_path = str(model_path_or_model)
        model = load_model(model_path_or_model)
    else:
        model = model_path_or_model
    if getattr(model, "schema", None) is None:
        raise TypeError(f"expected a tfface model (with a task schema), got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None:
        _check_limit(limit)  # before anything is written
    with replaced_folder(out_dir, is_evaluation_file, marker=METRICS_FILE) as staging:
        metrics, files = _evaluation(
            model, model_path, data_spec_or_sources, batch_size, thresholds, split, val_fraction, split_seed, limit,
            skip_bad_images,
        )
        for name, data in files.items():
            (staging / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return metrics


def check_evaluation_folder(out_dir) -> None:
    """Refuses an `out_dir` that holds anything but an earlier evaluation,
    before a command loads, calibrates or predicts anything."""
    check_output_folder(out_dir, is_evaluation_file, METRICS_FILE)


def is_evaluation_file(name: str) -> bool:
    """A file an evaluation writes (an earlier evaluation's folder may be
    replaced; a folder with anything else is not)."""
    if name in (METRICS_FILE, REPORT_FILE, MODEL_CARD_FILE, "accuracy.png", "group_masks.png"):
        return True
    return name.endswith(".png") and name.startswith(("confusion_", "subgroups_"))


def _evaluation(model, model_path, data_spec_or_sources, batch_size, thresholds, split, val_fraction, split_seed,
                limit=None, skip_bad_images=False):
    """(metrics, file name -> contents) of one evaluation."""
    from tfface.evaluation import plots
    from tfface.evaluation.model_card import model_card
    from tfface.evaluation.report import markdown_report

    schema = model.schema
    sources = open_sources(
        data_spec_or_sources, model.image_size, split=split, val_fraction=val_fraction, split_seed=split_seed
    )
    limit_record = None
    available = [len(s) for s in sources]
    if limit is not None:
        sources, available, limit_record = limit_sources(sources, limit)
    if skip_bad_images:
        from tfface.data.pipeline import drop_undecodable_images

        sources = [drop_undecodable_images(source) for source in sources]
    labelled = {t.name for s in sources for t in schema.labelled_by(s.format)}
    if not labelled:
        raise ValueError(
            f"the data ({', '.join(f'{s.name} [{s.format}]' for s in sources)}) labels none of the "
            f"tasks of the model's schema {schema.name!r}: nothing to evaluate"
        )
    has_labels = any(
        np.any(column >= 0)
        for s in sources
        for column in schema.encode_labels(s.format, s.columns, len(s)).values()
    )
    if not has_labels:
        raise ValueError(
            f"the data ({', '.join(s.name for s in sources)}) has no label values for the model's tasks "
            "(every label cell is empty or missing): nothing to evaluate"
        )
    from tfface.data.pipeline import naming_undecodable_images

    with naming_undecodable_images(sources):
        labels, probs, extras = collect_predictions(model, sources, batch_size=batch_size)
    metrics = compute_metrics(schema, labels, probs, thresholds)
    subgroups = subgroup_metrics(schema, labels, probs, thresholds)
    config = getattr(model, "model_config", None)
    from tfface import __version__

    metrics["tfface_version"] = __version__
    metrics["model"] = {
        "path": model_path,
        "type": getattr(config, "type", type(model).__name__),
        "backbone": getattr(config, "backbone", None),
        "schema": schema.name,
        "image_size": int(model.image_size),
    }
    metrics["data"] = [
        # `problems`: what reading the source skipped (bad file names, images
        # without label rows), so a skip is on record, not only in a log.
        # `n_images`: images scored; `n_images_available`: before a limit.
        {"name": s.name, "format": s.format, "n_images": len(s), "root": s.root, "split": split, "problems": list(s.problems)}
        | ({} if limit_record is None else {"n_images_available": n})
        for s, n in zip(sources, available)
    ]
    metrics["limit"] = limit_record
    if len(sources) > 1:
        source_ids = extras["_source"]
        metrics["per_source"] = {}
        for i, source in enumerate(sources):
            rows = source_ids == i
            part = compute_metrics(
                schema,
                {k: v[rows] for k, v in labels.items()},
                {k: v[rows] for k, v in probs.items()},
                thresholds,
            )
            metrics["per_source"][f"{i}:{source.name}"] = _headline(part)
    metrics["subgroups"] = subgroups

    # Render everything first, then write: a failing plot leaves no output.
    files = {"accuracy.png": plots.task_accuracy_png(metrics["tasks"])}
    for name, scores in metrics["tasks"].items():
        if scores["kind"] == "multiclass":
            files[f"confusion_{name}.png"] = plots.confusion_png(name, schema[name].classes, scores["confusion"])
    # One subgroup plot (gender when labelled); the table holds the rest.
    plotted_by = next((by for by in SUBGROUPINGS if any(r["by"] == by for r in subgroups)), None)
    if plotted_by is not None:
        files[f"subgroups_{plotted_by}.png"] = plots.subgroup_png(subgroups, plotted_by)
    if "_group_masks" in extras:
        files["group_masks.png"] = plots.mask_overlay_png(extras["images"], extras["_group_masks"])
    metrics["plots"] = sorted(files)
    metrics = _plain(metrics)
    files[REPORT_FILE] = markdown_report(metrics)
    files[MODEL_CARD_FILE] = model_card(model, metrics)
    files[METRICS_FILE] = json.dumps(metrics, indent=2, allow_nan=False)
    return metrics, files


def format_metrics(metrics: dict, worst: int = 5) -> str:
    """A short console summary of `compute_metrics` / `evaluate_model` output."""

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"images: {metrics.get('n_images', 0)}"]
    from tfface.evaluation.report import limit_line

    limit = limit_line(metrics.get("limit"))
    if limit:
        lines.append(f"limit: {limit}")
    if metrics.get("n_binary_tasks"):
        lines.append(
            f"mean accuracy {fmt(metrics.get('mean_accuracy'))}, mean balanced accuracy "
            f"{fmt(metrics.get('mean_balanced_accuracy'))} over {metrics['n_binary_tasks']} binary tasks"
        )
    if "gender_accuracy" in metrics:
        lines.append(f"gender accuracy {fmt(metrics['gender_accuracy'])}")
    if "age_group_exact" in metrics:
        lines.append(
            f"age group exact {fmt(metrics['age_group_exact'])}, one-off {fmt(metrics['age_group_one_off'])}"
        )
    if "race_accuracy" in metrics:
        lines.append(f"race accuracy {fmt(metrics['race_accuracy'])}")
    binary = [
        (scores["balanced_accuracy"], name)
        for name, scores in metrics.get("tasks", {}).items()
        if scores.get("kind") == "binary" and scores.get("balanced_accuracy") is not None
    ]
    if len(binary) > worst:
        weakest = ", ".join(f"{name} {value:.3f}" for value, name in sorted(binary)[:worst])
        lines.append(f"lowest balanced accuracy: {weakest}")
    return "\n".join(lines)


def print_metrics(metrics: dict) -> None:
    print(format_metrics(metrics))
