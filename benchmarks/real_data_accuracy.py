"""Accuracy of a trained model on the real-data validation splits.

Re-creates the training run's split from its config (identity-disjoint for
CelebA, fixed-seed for UTKFace) and reports, on CelebA validation images,
mean accuracy and mean balanced accuracy over the binary attributes, at the
default 0.5 thresholds and at per-attribute thresholds calibrated (to
maximise balanced accuracy) on *training* images, never on the validation
images reported; on UTKFace validation images, gender accuracy and age-group
exact and one-off accuracy.

Run (after `tfface train --config configs/gated_real.yaml`):
    python benchmarks/real_data_accuracy.py --run runs/gated_real
Writes benchmarks/results/accuracy_<run name>.json and docs/accuracy_<run name>.md.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from common import load_run
from common import parse_args
from common import positive_int
from common import report_path
from common import run
from common import write_results

ROOT = Path(__file__).resolve().parents[1]


def _history_epochs(history_file):
    """Epochs in a run's history.csv (None without one)."""
    if not history_file.is_file():
        return None
    return max(len(history_file.read_text().strip().splitlines()) - 1, 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training output dir (holds config.yaml, model.keras)")
    parser.add_argument("--calibration-images", type=positive_int, default=3000, help="training images used to calibrate")
    args = parse_args(parser)

    from tfface.evaluation.calibration import calibrate_thresholds
    from tfface.evaluation.evaluate import collect_predictions
    from tfface.evaluation.evaluate import compute_metrics
    from tfface.training.trainer import load_sources

    run = Path(args.run)
    config, model = load_run(run)  # refused when its split cannot be re-created
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    train_sources, val_sources = load_sources(config.data)
    celeba_val = [s for s in val_sources if s.format == "celeba"]
    utk_val = [s for s in val_sources if s.format == "utkface"]

    rng = np.random.default_rng(0)
    calibration = []
    per_source = max(1, args.calibration_images // len(train_sources))
    for source in train_sources:
        keep = np.sort(rng.choice(len(source), size=min(per_source, len(source)), replace=False))
        calibration.append(source.subset(keep))
    cal_labels, cal_probs, _ = collect_predictions(model, calibration)
    thresholds = calibrate_thresholds(model.schema, cal_labels, cal_probs)

    labels, probs, _ = collect_predictions(model, celeba_val)
    default = compute_metrics(model.schema, labels, probs)
    calibrated = compute_metrics(model.schema, labels, probs, thresholds=thresholds)
    utk = compute_metrics(model.schema, *collect_predictions(model, utk_val)[:2]) if utk_val else {}

    result = {
        "run": str(run),
        "model_type": config.model.type,
        # A run stopped by hand has no summary; its history still counts the epochs.
        "train_minutes": round(summary["train_seconds"] / 60, 1) if "train_seconds" in summary else None,
        "epochs": summary.get("epochs_run", _history_epochs(run / "history.csv")),
        "celeba_val_images": default["n_images"],
        "celeba_binary_tasks": default.get("n_binary_tasks"),
        "celeba_mean_accuracy": default["mean_accuracy"],
        "celeba_mean_balanced_accuracy": default["mean_balanced_accuracy"],
        "celeba_mean_accuracy_calibrated": calibrated["mean_accuracy"],
        "celeba_mean_balanced_accuracy_calibrated": calibrated["mean_balanced_accuracy"],
        "majority_class_mean_accuracy": float(
            np.mean([max(t["positive_rate"], 1 - t["positive_rate"]) for t in default["tasks"].values() if "positive_rate" in t])
        ),
        "utk_val_images": utk.get("n_images"),
        "utk_gender_accuracy": utk.get("gender_accuracy"),
        "utk_age_group_exact": utk.get("age_group_exact"),
        "utk_age_group_one_off": utk.get("age_group_one_off"),
        "utk_race_accuracy": utk.get("race_accuracy"),
        "per_attribute": {
            name: {
                "accuracy": task["accuracy"],
                "balanced_accuracy": task["balanced_accuracy"],
                "balanced_accuracy_calibrated": calibrated["tasks"][name]["balanced_accuracy"],
                "positive_rate": task.get("positive_rate"),
                "threshold": thresholds.get(name, 0.5),
            }
            for name, task in default["tasks"].items()
            if "positive_rate" in task
        },
        "targets": {"celeba_mean_accuracy": 0.90, "celeba_mean_balanced_accuracy": 0.80},
    }
    for key in ("celeba_mean_accuracy", "celeba_mean_balanced_accuracy", "celeba_mean_accuracy_calibrated",
                "celeba_mean_balanced_accuracy_calibrated", "majority_class_mean_accuracy", "utk_gender_accuracy",
                "utk_age_group_exact", "utk_age_group_one_off", "utk_race_accuracy"):
        value = result[key]
        print(f"{key:45s} {value:.4f}" if isinstance(value, float) else f"{key:45s} {value}")
    name = run.name
    write_results(f"accuracy_{name}", result)
    write_markdown(result, report_path(ROOT / "docs" / f"accuracy_{name}.md"))


def write_markdown(result, path):
    lines = [
        f"# Real-data accuracy: `{result['run']}` ({result['model_type']} model; generated by benchmarks/real_data_accuracy.py)",
        "",
        f"Trained from scratch for {result['train_minutes'] if result['train_minutes'] is not None else 'an unrecorded number of'} "
        f"minutes ({result['epochs']} epochs) on a 2-core CPU. "
        f"CelebA: {result['celeba_val_images']} identity-disjoint validation images, {result['celeba_binary_tasks']} binary tasks. "
        f"UTKFace: {result['utk_val_images']} validation images.",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| CelebA mean accuracy (thresholds 0.5) | {result['celeba_mean_accuracy']:.4f} | 0.90 |",
        f"| CelebA mean balanced accuracy (thresholds 0.5) | {result['celeba_mean_balanced_accuracy']:.4f} | 0.80 |",
        f"| CelebA mean accuracy (thresholds calibrated on training images) | {result['celeba_mean_accuracy_calibrated']:.4f} | |",
        f"| CelebA mean balanced accuracy (calibrated thresholds) | {result['celeba_mean_balanced_accuracy_calibrated']:.4f} | |",
        f"| majority-class mean accuracy (reference) | {result['majority_class_mean_accuracy']:.4f} | |",
        f"| UTKFace gender accuracy | {_f(result['utk_gender_accuracy'])} | |",
        f"| UTKFace age group exact | {_f(result['utk_age_group_exact'])} | |",
        f"| UTKFace age group one-off | {_f(result['utk_age_group_one_off'])} | |",
        f"| UTKFace race accuracy | {_f(result['utk_race_accuracy'])} | |",
        "",
        "| attribute | positive rate | accuracy | balanced acc. (0.5) | balanced acc. (calibrated) | threshold |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in sorted(result["per_attribute"].items()):
        lines.append(
            f"| {name} | {_f(row['positive_rate'])} | {_f(row['accuracy'])} | {_f(row['balanced_accuracy'])} | "
            f"{_f(row['balanced_accuracy_calibrated'])} | {row['threshold']:.3f} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def _f(value):
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    run(main)
