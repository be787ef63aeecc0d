"""Ablations on real data, one script, same data split and time budget for every variant.

Gated model (Celona et al.): no gate, static gate, input-conditioned gate,
+ correlation layer, + center loss. Mask-guided model (MGMTN): global
features only, group features only, group-global fusion, and the fusion
model fed masks drawn from landmarks at inference instead of its predicted
masks. Each variant trains from scratch on the fused CelebA + UTKFace
training split under the same wall-clock budget, then is evaluated on the
identity-disjoint CelebA validation split (mean accuracy and mean balanced
accuracy over the 39 binary attributes it labels) and on the UTKFace
validation split (gender accuracy, age-group exact and one-off accuracy).
Differences against the first variant get 95% paired-bootstrap confidence
intervals (images resampled with replacement, 1000 times).

Run:
    python benchmarks/ablation.py --model gated --minutes 6
    python benchmarks/ablation.py --model mask_guided --minutes 6
    python benchmarks/ablation.py --model gated --epochs 4   # same epochs, not time
    python benchmarks/ablation.py --model gate_bottleneck --epochs 5
    python benchmarks/ablation.py --model routing --epochs 5
    python benchmarks/ablation.py --model mask_schedule --epochs 5
Writes benchmarks/results/ablation_<model>.json and docs/ablation_<model>.md.
"""

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
from common import parse_args
from common import positive_int
from common import print_table
from common import report_path
from common import run
from common import write_results

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "gated": [
        ("no gate", dict(gate="none", correlation=False, center_loss_weight=0.0)),
        ("static gate", dict(gate="static", correlation=False, center_loss_weight=0.0)),
        ("input-conditioned gate", dict(gate="input_conditioned", correlation=False, center_loss_weight=0.0)),
        ("static gate + correlation", dict(gate="static", correlation=True, center_loss_weight=0.0)),
        ("static gate + correlation + center loss", dict(gate="static", correlation=True, center_loss_weight=0.01)),
    ],
    "mask_guided": [
        ("global features only", dict(type="mask_guided", fusion="global")),
        ("group features only", dict(type="mask_guided", fusion="group")),
        ("group-global fusion", dict(type="mask_guided", fusion="group_global")),
        # Same trained weights as the fusion model, fed landmark masks.
        ("group-global fusion, landmark masks at inference", "landmark_masks"),
    ],
    # The full gated model with its gates on the backbone's 256 pooled
    # channels (docs/design.md) against gates on a narrower shared bottleneck,
    # which makes the heads cheaper (benchmarks/model_latency.py).
    "gate_bottleneck": [
        ("full gated model, gates on the 256 backbone channels", dict(gate="static", correlation=True)),
        ("same, gates on a 128-channel bottleneck", dict(gate="static", correlation=True, gate_bottleneck=128)),
        ("same, gates on a 64-channel bottleneck", dict(gate="static", correlation=True, gate_bottleneck=64)),
    ],
    # The full gated model's channel gates (docs/design.md) against routing
    # through a mixture of shared experts (its ablation B), whose per-task
    # work does not scale with the backbone's width.
    "routing": [
        ("full gated model, static channel gates", dict(gate="static", correlation=True)),
        ("same, mixture of 4 experts", dict(gate="mixture_of_experts", num_experts=4, correlation=True)),
        ("same, mixture of 8 experts", dict(gate="mixture_of_experts", num_experts=8, correlation=True)),
    ],
    # MGMTN's two ways to train the mask predictor (docs/design.md): jointly
    # through the mask loss (the shipped configs) or pretrained alone on the
    # landmark masks and then frozen (the paper's schedule).
    "mask_schedule": [
        ("group-global fusion, mask predictor trained jointly", dict(type="mask_guided", fusion="group_global")),
        (
            "same, predictor pretrained 2 epochs alone, then frozen",
            {"type": "mask_guided", "fusion": "group_global", "mask_trainable": False, "train.mask_pretrain_epochs": 2},
        ),
    ],
}
# The shipped config each set of variants starts from.
BASE_CONFIGS = {
    "gated": "gated_real.yaml",
    "mask_guided": "mask_guided_real.yaml",
    "mask_schedule": "mask_guided_real.yaml",
    "gate_bottleneck": "gated_real.yaml",
    "routing": "gated_real.yaml",
}


def bootstrap_balanced_accuracy(labels, probs, tasks, weights):
    """Mean balanced accuracy over `tasks` for each row of `weights` (B, n)."""
    values = []
    for task in tasks:
        y = labels[task.name]
        pred = (probs[task.name] >= task.threshold).astype(np.float64)
        valid = y >= 0
        pos = ((y > 0.5) & valid).astype(np.float64)
        neg = ((y < 0.5) & valid).astype(np.float64)
        tp = weights @ (pos * pred)
        tn = weights @ (neg * (1 - pred))
        p, n = weights @ pos, weights @ neg
        recalls = np.stack([tp / np.maximum(p, 1e-9), tn / np.maximum(n, 1e-9)])
        present = np.stack([p > 0, n > 0]).astype(np.float64)
        values.append((recalls * present).sum(0) / np.maximum(present.sum(0), 1))
    return np.mean(values, axis=0)


def bootstrap_accuracy(labels, probs, tasks, weights):
    values = []
    for task in tasks:
        y = labels[task.name]
        valid = (y >= 0).astype(np.float64)
        correct = ((probs[task.name] >= task.threshold) == (y > 0.5)).astype(np.float64) * valid
        values.append((weights @ correct) / np.maximum(weights @ valid, 1e-9))
    return np.mean(values, axis=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(VARIANTS), default="gated")
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per variant")
    parser.add_argument(
        "--epochs", type=positive_int, help="train every variant exactly this many epochs instead (no time budget)"
    )
    parser.add_argument("--config", help="base experiment config (default: the shipped one, BASE_CONFIGS)")
    parser.add_argument("--only", nargs="*", help="run only these variant indices")
    parser.add_argument("--bootstrap", type=positive_int, default=1000)
    args = parse_args(parser)

    import keras

    from tfface.config import ExperimentConfig
    from tfface.evaluation.evaluate import collect_predictions
    from tfface.evaluation.evaluate import compute_metrics
    from tfface.training.trainer import load_sources
    from tfface.training.trainer import train

    config_path = Path(args.config or ROOT / "configs" / BASE_CONFIGS[args.model])
    base = ExperimentConfig.load(config_path)
    _, val_sources = load_sources(base.data)
    celeba_val = [s for s in val_sources if s.format == "celeba"]
    utk_val = [s for s in val_sources if s.format == "utkface"]
    n_celeba = sum(len(s) for s in celeba_val)
    if n_celeba == 0:
        raise ValueError(f"{config_path} has no CelebA validation images to compare the variants on")
    rng = np.random.default_rng(0)
    weights = rng.multinomial(n_celeba, np.full(n_celeba, 1.0 / n_celeba), size=args.bootstrap).astype(np.float64)

    rows, samples = [], {}
    trained = {}
    for index, (label, overrides) in enumerate(VARIANTS[args.model]):
        if args.only and str(index) not in args.only:
            continue
        start = time.monotonic()
        if overrides == "landmark_masks":
            model = trained.get("group-global fusion")
            if model is None:
                rows.append({"variant": label, "note": "needs the group-global variant in the same run"})
                continue
            from tfface.models.mask_guided_model import landmark_mask_variant

            model = landmark_mask_variant(model)
            summary = {"epochs_run": "same as above", "train_seconds": 0.0}
        else:
            config = ExperimentConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(base))))
            for key, value in overrides.items():
                section, _, field = key.rpartition(".")
                setattr(getattr(config, section or "model"), field, value)
            if args.epochs:
                # Same compute for every variant whatever the machine's load;
                # the learning-rate schedule decays over these epochs.
                config.train.epochs = args.epochs
                config.train.time_budget_minutes = None
            else:
                config.train.time_budget_minutes = args.minutes
            config.train.early_stopping_patience = 0
            config.train.output_dir = str(ROOT / "runs" / f"ablation_{args.model}" / f"variant{index}")
            # A fresh run: a backup left in the folder would resume an old one.
            shutil.rmtree(config.train.output_dir, ignore_errors=True)
            summary = train(config.validate(), verbose=0)
            from tfface.models.saving import load_model

            model = load_model(summary["model_path"])
            trained[label] = model
        labels, probs, _ = collect_predictions(model, celeba_val)
        binary = [t for t in model.schema.binary_tasks if (labels[t.name] >= 0).any()]
        celeba = compute_metrics(model.schema, labels, probs)
        utk = compute_metrics(model.schema, *collect_predictions(model, utk_val)[:2]) if utk_val else {}
        unit = np.ones((1, n_celeba))  # the measured value, the bootstrap's centre
        samples[label] = (
            (bootstrap_accuracy(labels, probs, binary, weights), bootstrap_accuracy(labels, probs, binary, unit)[0]),
            (
                bootstrap_balanced_accuracy(labels, probs, binary, weights),
                bootstrap_balanced_accuracy(labels, probs, binary, unit)[0],
            ),
        )
        rows.append(
            {
                "variant": label,
                "epochs": summary["epochs_run"],
                "train_s": round(summary["train_seconds"], 1),
                "params": model.count_params(),
                "celeba_mean_accuracy": celeba["mean_accuracy"],
                "celeba_mean_balanced_accuracy": celeba["mean_balanced_accuracy"],
                "utk_gender_accuracy": utk.get("gender_accuracy"),
                "utk_age_exact": utk.get("age_group_exact"),
                "utk_age_one_off": utk.get("age_group_one_off"),
                "eval_s": round(time.monotonic() - start - summary["train_seconds"], 1),
            }
        )
        print_table(rows[-1:], list(rows[-1]))
        if overrides != "landmark_masks":
            keras.backend.clear_session()

    baseline = rows[0]["variant"] if rows else None
    for row in rows:
        if row["variant"] in samples and row["variant"] != baseline and baseline in samples:
            for i, metric in enumerate(("mean_accuracy", "mean_balanced_accuracy")):
                (resampled, measured), (base_resampled, base_measured) = samples[row["variant"]][i], samples[baseline][i]
                low, high = np.percentile(resampled - base_resampled, [2.5, 97.5])
                row[f"d_{metric}"] = float(measured - base_measured)
                row[f"d_{metric}_ci95"] = [float(low), float(high)]

    columns = ["variant", "epochs", "celeba_mean_accuracy", "celeba_mean_balanced_accuracy", "d_mean_balanced_accuracy",
               "utk_gender_accuracy", "utk_age_exact", "utk_age_one_off", "params", "train_s"]
    print_table(rows, columns)
    payload = {"model": args.model, "config": str(config_path),
               "minutes_per_variant": None if args.epochs else args.minutes, "epochs_per_variant": args.epochs,
               "celeba_val_images": n_celeba, "utk_val_images": sum(len(s) for s in utk_val),
               "bootstrap": args.bootstrap, "rows": rows}
    write_results(f"ablation_{args.model}", payload)
    write_markdown(payload, report_path(ROOT / "docs" / f"ablation_{args.model}.md"))


def write_markdown(payload, path):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        if isinstance(v, list):
            return f"[{v[0]:+.4f}, {v[1]:+.4f}]"
        return "" if v is None else str(v)

    lines = [
        f"# Ablation: {payload['model']} model (generated by benchmarks/ablation.py)",
        "",
        "Same fused CelebA + UTKFace training split and "
        + (
            f"exactly {payload['epochs_per_variant']} epochs per variant (learning rate decayed over them)"
            if payload.get("epochs_per_variant")
            else f"a {payload['minutes_per_variant']}-minute CPU budget per variant"
        )
        + f"; evaluated on {payload['celeba_val_images']} identity-disjoint CelebA validation images and "
        f"{payload['utk_val_images']} UTKFace validation images. Differences are against the first row, with 95% "
        f"paired-bootstrap intervals ({payload['bootstrap']} resamples of the CelebA validation images).",
        "",
        "| variant | epochs | CelebA mean acc. | CelebA mean bal. acc. | Δ bal. acc. | 95% CI | Δ acc. | 95% CI | UTK gender acc. | UTK age exact | UTK age 1-off |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        lines.append(
            "| " + " | ".join(fmt(row.get(k)) for k in (
                "variant", "epochs", "celeba_mean_accuracy", "celeba_mean_balanced_accuracy",
                "d_mean_balanced_accuracy", "d_mean_balanced_accuracy_ci95", "d_mean_accuracy", "d_mean_accuracy_ci95",
                "utk_gender_accuracy", "utk_age_exact", "utk_age_one_off")) + " |"
        )
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
