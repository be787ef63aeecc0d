"""The benchmark scripts' shared plumbing: where results go, what JSON they
write, and how bad options and missing inputs are reported."""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def common(monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_trial_run_writes_into_its_results_dir_and_never_writes_nan(common, tmp_path, monkeypatch):
    recorded = tmp_path / "recorded"
    monkeypatch.setattr(common, "RESULTS", recorded)
    parser = argparse.ArgumentParser()
    common.parse_args(parser, ["--results-dir", str(tmp_path / "trial")])
    path = common.write_results("x", {"iou": math.nan, "rows": [{"ratio": math.inf}, {"ratio": 1.5}]})
    assert path == tmp_path / "trial" / "x.json" and not recorded.exists()
    written = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON token {c}"))
    assert written["iou"] is None and written["rows"] == [{"ratio": None}, {"ratio": 1.5}]
    assert common.report_path(Path("/repo/docs/ablation_gated.md")) == tmp_path / "trial" / "ablation_gated.md"

    common.parse_args(argparse.ArgumentParser(), [])  # no --results-dir: the recorded places
    assert common.write_results("y", {}) == recorded / "y.json"
    assert common.report_path(Path("/repo/docs/a.md")) == Path("/repo/docs/a.md")


def test_bad_sizes_and_missing_inputs_are_one_line_errors(common, tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        common.positive_int("0")
    assert common.positive_ints("64, 128") == [64, 128] and common.positive_ints("") == []
    with pytest.raises(FileNotFoundError, match="no `tfface train` output folder"):
        common.load_run(tmp_path / "nope")
    old_run = tmp_path / "old_run"  # a run of a tfface before 0.2.0: its split is not re-created
    old_run.mkdir()
    (old_run / "config.yaml").write_text("name: old\n")
    with pytest.raises(ValueError, match="records no split method.*cannot be re-created here"):
        common.load_run(old_run)

    def refuse(*args):
        return subprocess.run([sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)

    bad = refuse(str(BENCHMARKS / "model_latency.py"), "--repeats", "0")
    assert bad.returncode == 2 and "--repeats: must be >= 1, got 0" in bad.stderr
    missing = refuse(str(BENCHMARKS / "mask_quality.py"), "--run", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert f"error: {tmp_path / 'nope'} is no `tfface train` output folder" in missing.stderr
    old = refuse(str(BENCHMARKS / "real_data_accuracy.py"), "--run", str(old_run))
    assert old.returncode == 2 and "records no split method" in old.stderr
    startup = refuse(str(BENCHMARKS / "train_startup.py"), "--baseline-tree", str(tmp_path))
    assert startup.returncode == 2 and f"--baseline-tree {tmp_path} is not a tfface checkout" in startup.stderr
    schema = refuse(str(BENCHMARKS / "train_startup.py"), "--schemas", "fused,nope")
    assert schema.returncode == 2 and "'nope'" in schema.stderr and "Traceback" not in schema.stderr
