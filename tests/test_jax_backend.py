"""The gated model trains and round-trips under the JAX backend.

Keras fixes its backend at import, so the work runs in a subprocess
(tests/jax_train_step.py) with KERAS_BACKEND=jax. Skipped where jax is not
installed (it is a test-only dependency).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install 'jax[cpu]')"
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "jax_train_step.py"


@pytest.mark.parametrize("gate", ["input_conditioned", "mixture_of_experts"])
def test_gated_model_fits_and_round_trips_under_jax(gate, tmp_path):
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        # Tiny graphs: XLA's optimisation passes cost more than they save.
        XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), gate],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"jax_train_step.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax"
    assert report["steps"] == 2
    assert len(report["loss"]) == 1 and math.isfinite(report["loss"][0]) and report["loss"][0] > 0
    # Every kind of state moved: heads, gates or router, correlation C, center-loss
    # centers (trained through compute_loss) and the correlation moving mean.
    assert report["changed"] == {k: True for k in report["changed"]}
    assert set(report["changed"]) == {"heads", "routing", "correlation", "centers", "moving_mean"}
    assert report["reloaded_class"] == "GatedMultiTaskModel"
    assert report["output_keys"] == sorted(
        ["left_bright", "unlabelled", "age_group", "_logits", "_raw_logits", "_embeddings"]
    )
    assert max(report["max_diff"].values()) == 0.0, report["max_diff"]
