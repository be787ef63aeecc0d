"""Shared bits of the benchmark scripts: timing, tables, JSON results."""

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = Path(__file__).resolve().parent / "results"
# Where this run writes: the recorded results, unless --results-dir says otherwise.
_output_dir = None


def parse_args(parser, argv=None):
    """`parser.parse_args()` plus `--results-dir`, which every benchmark takes."""
    parser.add_argument(
        "--results-dir",
        type=Path,
        help="write the JSON (and any Markdown report) into this folder instead of over the recorded "
        "results in benchmarks/results/ and docs/ (for trial runs)",
    )
    args = parser.parse_args(argv)
    global _output_dir
    _output_dir = args.results_dir
    return args


def report_path(default: Path) -> Path:
    """A Markdown report's path: `default` (under docs/), or the same name
    in --results-dir."""
    return _output_dir / Path(default).name if _output_dir else Path(default)


def positive_int(text):
    """argparse type: an integer >= 1 (the `tfface` CLI's own check)."""
    from tfface.cli import _positive_int

    return _positive_int(text)


def positive_ints(text):
    """argparse type: a comma list of integers >= 1 ("" is none)."""
    return [positive_int(part) for part in text.split(",") if part.strip()]


def run(main):
    """Runs a benchmark's `main`, turning a missing file or a bad value into
    one line on stderr and exit status 2 instead of a traceback."""
    import sys

    from tfface.config import ConfigError

    try:
        main()
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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


def _without_nan(value):
    """NaN and infinity as null: JSON has no NaN (json.dumps writes an
    invalid `NaN` token)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def write_results(name, payload):
    folder = _output_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(_without_nan(payload), indent=2, default=str, allow_nan=False))
    print(f"wrote {path}")
    return path


def load_run(run, check_split=True):
    """(experiment config, model) of a `tfface train` output folder; with
    `check_split`, refused when the run's split is not the one this tfface
    re-creates from its config (its validation images would not be its)."""
    from tfface.config import ExperimentConfig
    from tfface.models.saving import load_model
    from tfface.training.resume import check_run_split

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is no `tfface train` output folder (no config.yaml there)")
    if check_split:
        check_run_split(run, "its validation split cannot be re-created here")
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
