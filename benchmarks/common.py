"""Shared bits of the benchmark scripts: timing, tables, JSON results."""

import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = Path(__file__).resolve().parent / "results"


def time_call(fn, repeats=10, warmup=2):
    """Median and spread of `fn()` wall time in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "repeats": repeats,
    }


def print_table(rows, columns):
    widths = [max(len(str(c)), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_results(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")
    return path


def load_run(run):
    """(experiment config, model) of a `tfface train` output folder."""
    from tfface.config import ExperimentConfig
    from tfface.models.saving import load_model

    run = Path(run)
    return ExperimentConfig.load(run / "config.yaml"), load_model(run)


def model_for_benchmark(path=None):
    """(model, description): a trained `.keras` model, or the default gated
    model untrained (speed does not depend on the weights)."""
    from tfface.config import ModelConfig
    from tfface.schema import get_schema
    from tfface.models.build import build_model
    from tfface.models.saving import load_model

    if path:
        return load_model(path), str(path)
    model = build_model(get_schema("fused"), ModelConfig(image_size=64))
    return model, "untrained gated, fused schema, 64 px, widths (32, 64, 128, 256)"
