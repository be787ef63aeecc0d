"""The benchmark scripts' shared plumbing: where results go, what JSON they
write, and how bad options and missing inputs are reported."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def run_python(script, **env):
    """`script` in a fresh Python in benchmarks/, tfface and the benchmarks
    importable, JAX on the CPU: JAX's threads must not be in a pytest
    worker that forks."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS)]), **env,
    )
    return subprocess.run([sys.executable, "-c", script], cwd=BENCHMARKS, env=env, capture_output=True, text=True, timeout=300)


@needs_jax
def test_the_jax_port_of_the_augmentation_warps_as_the_training_pipeline_does():
    """capacity_jax.py trains on the GPU machine (no TensorFlow) with its own
    port of augment_example: its affine warp must be the pipeline's."""
    script = """
import json, numpy as np, tensorflow as tf
import capacity_jax
from tfface.data.pipeline import affine_example
image = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype("float32")
y = {"_landmarks": tf.zeros((68, 2)), "_has_landmarks": tf.constant(0.0)}
rows = []
for scale, angle, shift in [(1.07, 0.14, (0.03, -0.02)), (0.93, -0.16, (-0.04, 0.04))]:
    expected, _ = affine_example(tf.constant(image), y, tf.constant(scale), tf.constant(angle), tf.constant(shift))
    warped = np.asarray(capacity_jax.affine(image, scale, angle, np.asarray(shift, np.float32)))
    rows.append([float(np.abs(warped - expected.numpy()).max()), float(np.abs(warped - image).mean())])
print(json.dumps(rows))
"""
    done = run_python(script)
    assert done.returncode == 0, done.stderr[-3000:]
    for difference, change in json.loads(done.stdout.strip().splitlines()[-1]):
        assert difference < 0.05  # of 255, borders included
        assert change > 10  # it did warp


@needs_jax
@pytest.mark.slow
def test_a_split_exported_for_the_gpu_machine_trains_there_under_jax(tmp_path):
    """export_split_arrays.py then capacity_jax.py, as on the GPU machine:
    the second runs under KERAS_BACKEND=jax with TensorFlow unimportable."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "name: tiny\ndata: {sources: ['synthetic:160'], schema: synthetic, image_size: 32, batch_size: 16, "
        "val_fraction: 0.25}\nmodel: {type: gated, image_size: 32, backbone_widths: [8, 16, 32, 64], embedding_dim: 16}\n"
        "train: {epochs: 2, warmup_epochs: 1}\n"
    )
    split = tmp_path / "split.npz"
    exported = subprocess.run(
        [sys.executable, str(BENCHMARKS / "export_split_arrays.py"), "--config", str(config), "--out", str(split)],
        cwd=BENCHMARKS, capture_output=True, text=True, timeout=300,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "mean absolute error" in exported.stdout and split.is_file()
    arrays = np.load(split)
    assert len(arrays["train/jpeg_offsets"]) - 1 == len(arrays["train/_source"]) > len(arrays["val/_source"]) > 0

    block_tensorflow = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'tensorflow':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.argv = ['capacity_jax.py', '--data', {str(split)!r}, '--config', {str(config)!r}, '--runs', '2', "
        f"'--results-dir', {str(tmp_path / 'results')!r}]\n"
        "import runpy\n"
        "runpy.run_path('capacity_jax.py', run_name='__main__')\n"
    )
    trained = run_python(block_tensorflow, KERAS_BACKEND="jax", XLA_FLAGS="--xla_backend_optimization_level=0")
    assert trained.returncode == 0, trained.stderr[-3000:]
    (result_file,) = (tmp_path / "results").glob("capacity_tiny_*.json")
    result = json.loads(result_file.read_text())
    (run,) = result["runs"]
    assert result["backend"] == "jax" and run["epochs_trained"] == 2 and len(run["history"]) == 2
    # Synthetic sources: no CelebA rows, so the best epoch is picked on every validation image.
    assert run["best"]["celeba_mean_accuracy"] is None and 0 <= run["best"]["mean_balanced_accuracy"] <= 1
    assert (tmp_path / "results" / "capacity_tiny.md").is_file()
