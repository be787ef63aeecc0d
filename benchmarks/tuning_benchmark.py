"""KerasTuner search: memory over trials, and the real-data search against
the hand-set default (issue: KerasTuner searches over gates and loss weights).

--memory  runs a 10-trial random search on synthetic data and records the
          process RSS after each trial (each trial's model is released with
          keras.backend.clear_session() + gc; the data is read once). Growth
          after the first trial must stay small. Writes
          benchmarks/results/tuning_memory.json. A few minutes on 2 CPU cores.

--real    runs the real-data search of tuning/gated_real.yaml (celeba_sample
          + celeba_lowres + utkface, fused schema, 60-minute budget), then
          trains the hand-set default config and the best config found with
          the same protocol (same data, seed and epochs: the search's
          max_epochs), and writes docs/tuning_results.md and
          benchmarks/results/tuning.json. About 60 + 2 x max_epochs epochs.
          Resumes a killed search (same command).

Run: python benchmarks/tuning_benchmark.py --memory [--trials 10]
     python benchmarks/tuning_benchmark.py --real [--config tuning/gated_real.yaml]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import parse_args
from common import positive_int
from common import print_table
from common import report_path
from common import run
from common import write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OBJECTIVE = "val_mean_balanced_accuracy"


def rss_mb() -> float:
    """Resident set size of this process now (not the peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    import resource  # pragma: no cover - not Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- memory -----------------------------------------------------------------------


def memory(args):
    import yaml

    from tfface.tuning.search import run_search

    work = Path(tempfile.mkdtemp(prefix="tfface_tuning_memory_"))
    config = {
        "project": "memory",
        "tuner": "random",
        "max_trials": args.trials,
        "epochs": 1,
        "seed": 0,
        "search_space": str(REPO / "tuning" / "gated_search_space.yaml"),
        "experiment": {
            "name": "memory",
            "data": {"sources": [f"synthetic:{args.images}"], "schema": "synthetic", "image_size": 32,
                     "batch_size": 32, "val_fraction": 0.2},
            "model": {"type": "gated", "image_size": 32, "backbone_widths": [8, 16, 32, 64], "embedding_dim": 16},
            "train": {"epochs": 1},
        },
    }
    path = work / "memory.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    rows = []
    start = time.time()

    def after_trial(trial):
        rows.append({
            "trial": trial.trial_id,
            "status": str(trial.status),
            "rss_mb": round(rss_mb(), 1),
            "seconds": round(time.time() - start, 1),
        })

    import tensorflow  # noqa: F401  (so the baseline includes it)

    before = rss_mb()
    try:
        result = run_search(path, verbose=0, on_trial_end=after_trial)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for i, row in enumerate(rows):
        row["delta_mb"] = round(row["rss_mb"] - rows[i - 1]["rss_mb"], 1) if i else None
        row["since_first_mb"] = round(row["rss_mb"] - rows[0]["rss_mb"], 1)
    print_table(rows, ["trial", "status", "rss_mb", "delta_mb", "since_first_mb", "seconds"])
    growth = rows[-1]["rss_mb"] - rows[0]["rss_mb"]
    per_trial = growth / max(1, len(rows) - 1)
    # Least-squares slope: RSS swings by tens of MiB between trials (malloc).
    xs = list(range(len(rows)))
    mean_x, mean_y = sum(xs) / len(xs), sum(r["rss_mb"] for r in rows) / len(rows)
    var_x = sum((x - mean_x) ** 2 for x in xs) or 1.0
    slope = sum((x - mean_x) * (r["rss_mb"] - mean_y) for x, r in zip(xs, rows)) / var_x
    ok = slope < args.max_slope_mb
    print(f"RSS before the search (TensorFlow imported): {before:.0f} MiB; after trial 1: {rows[0]['rss_mb']:.0f} MiB; "
          f"after trial {len(rows)}: {rows[-1]['rss_mb']:.0f} MiB")
    print(f"growth after the first trial: {growth:.1f} MiB in {len(rows) - 1} trials ({per_trial:.1f} MiB/trial); "
          f"fitted slope {slope:.1f} MiB/trial: {'OK' if ok else 'TOO MUCH'} (limit {args.max_slope_mb} MiB/trial)")
    write_results("tuning_memory", {
        "benchmark": "tuning_memory",
        "trials": args.trials,
        "images": args.images,
        "rss_before_search_mb": round(before, 1),
        "rows": rows,
        "growth_after_first_trial_mb": round(growth, 1),
        "growth_per_trial_mb": round(per_trial, 2),
        "slope_mb_per_trial": round(slope, 2),
        "slope_limit_mb_per_trial": args.max_slope_mb,
        "ok": ok,
        "search_seconds": result["search_seconds"],
        "best": result["best"],
    })
    if not ok:
        sys.exit(1)


# --- real data ----------------------------------------------------------------------


def score_config(config, data, epochs, seed):
    """Trains `config` for `epochs` on the search's data with the trial
    protocol; returns (best objective over the epochs, per-epoch values)."""
    import keras

    from tfface.tuning.hypermodels import build_trial_model

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build_trial_model(config, data.steps_per_epoch, epochs, data.train_labels)
    history = model.fit(data.train, validation_data=data.val, epochs=epochs, verbose=2)
    values = [float(v) for v in history.history[OBJECTIVE]]
    del model
    keras.backend.clear_session()
    return max(values), values


def real(args):
    from tfface.config import ExperimentConfig
    from tfface.data.sources import shared_data_dir
    from tfface.tuning.search import load_search_data
    from tfface.tuning.search import prepare
    from tfface.tuning.search import run_search

    if shared_data_dir() is None:
        sys.exit("the real data was not found (set TFFACE_DATA_DIR or put shared/data beside the repository)")
    tuning, base, space = prepare(args.config)
    start = time.time()
    data = load_search_data(base)
    load_seconds = time.time() - start
    result = run_search(args.config, data=data)
    best_config = ExperimentConfig.load(result["best_config"])
    epochs = tuning.trial_epochs
    print(f"scoring the hand-set default and the best config for {epochs} epochs each")
    default_score, default_curve = score_config(base, data, epochs, tuning.seed)
    best_score, best_curve = score_config(best_config, data, epochs, tuning.seed)

    trials = result["trials"]
    completed = [t for t in trials if t["status"] == "COMPLETED"]
    payload = {
        "benchmark": "tuning_real",
        "tuning_config": _relative(args.config),
        "tuner": tuning.tuner,
        "time_budget_minutes": tuning.time_budget_minutes,
        "search_seconds": result["search_seconds"],
        "stopped_by_budget": result["stopped_by_budget"],
        "data_load_seconds": round(load_seconds, 1),
        "train_steps_per_epoch": data.steps_per_epoch,
        "trials": len(trials),
        "completed_trials": len(completed),
        "best_trial": result["best"],
        "retrain_epochs": epochs,
        "default": {"score": default_score, "per_epoch": default_curve},
        "best_retrained": {"score": best_score, "per_epoch": best_curve},
        "best_config": _relative(result["best_config"]),
        "summary": _relative(result["summary"]),
    }
    write_results(args.results_name, payload)
    out = report_path(Path(args.report))
    out.write_text(results_markdown(payload, base, best_config, space, Path(result["summary"]).read_text()))
    print(f"wrote {out}")
    print_table(
        [
            {"config": "hand-set default", OBJECTIVE: default_score},
            {"config": f"best of search (trial {result['best']['trial_id']}), retrained", OBJECTIVE: best_score},
            {"config": "best trial during the search", OBJECTIVE: result["best"]["score"]},
        ],
        ["config", OBJECTIVE],
    )


def _relative(path) -> str:
    """A path relative to the repository when it is inside it (for the report)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def results_markdown(payload, base, best_config, space, trials_summary) -> str:
    def value_of(config, name):
        if name.startswith("loss_weights."):
            return config.model.loss_weights.get(name.split(".", 1)[1], 1.0)
        if hasattr(config.model, name):
            return getattr(config.model, name)
        return getattr(config.train, name)

    def fmt(value):
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    data = " + ".join(s.path for s in base.data.sources)
    schema = base.data.schema if isinstance(base.data.schema, str) else "inline"

    lines = [
        "# KerasTuner search on real data",
        "",
        "Written by `python benchmarks/tuning_benchmark.py --real` (search config: "
        f"`{payload['tuning_config']}`, {payload['tuner']} tuner, {payload['time_budget_minutes']}-minute budget; "
        f"data: {data}, {schema} schema, {base.data.image_size} px; model: {base.model.type}).",
        "",
        f"The search ran {payload['trials']} trials ({payload['completed_trials']} completed) in "
        f"{payload['search_seconds'] / 60:.1f} min"
        + (" and was stopped by its time budget." if payload["stopped_by_budget"] else "."),
        f"Both rows below were trained the same way afterwards: same data and split, seed, and "
        f"{payload['retrain_epochs']} epochs; the score is the best epoch's {OBJECTIVE} "
        "(masked: only labelled binary attributes count).",
        "",
        f"| config | {OBJECTIVE} |",
        "|---|---:|",
        f"| hand-set default | {payload['default']['score']:.4f} |",
        f"| best of the search (trial {payload['best_trial']['trial_id']}) "
        f"| {payload['best_retrained']['score']:.4f} |",
        "",
        f"During the search the best trial scored {payload['best_trial']['score']:.4f}. The best of many noisy "
        "trials is an optimistic estimate, hence the retraining above.",
        "",
        "## Hyperparameters",
        "",
        "| hyperparameter | hand-set default | best |",
        "|---|---|---|",
    ]
    for name in space.names:
        lines.append(f"| {name} | {fmt(value_of(base, name))} | {fmt(value_of(best_config, name))} |")
    lines += ["", "## All trials", ""]
    table = trials_summary.split("## Trials", 1)[-1].split("## Search space", 1)[0].strip()
    lines += [table, ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--memory", action="store_true", help="RSS after each of --trials trials (synthetic data)")
    mode.add_argument("--real", action="store_true", help="the real-data search and the default's score")
    parser.add_argument("--trials", type=positive_int, default=10)
    parser.add_argument("--images", type=positive_int, default=400)
    parser.add_argument("--max-slope-mb", type=float, default=15.0, help="--memory: allowed RSS growth per trial")
    parser.add_argument("--config", default=str(REPO / "tuning" / "gated_real.yaml"), help="--real: tuning config")
    parser.add_argument("--report", default=str(REPO / "docs" / "tuning_results.md"), help="--real: Markdown report")
    parser.add_argument("--results-name", default="tuning", help="--real: benchmarks/results/NAME.json")
    args = parse_args(parser)
    if args.memory:
        memory(args)
    else:
        real(args)


if __name__ == "__main__":
    run(main)
