"""The gated and mask-guided models train and round-trip under the JAX backend.

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


GATED_STATE = {"heads", "routing", "correlation", "centers", "moving_mean"}
GATED_OUTPUTS = ["left_bright", "unlabelled", "age_group", "_logits", "_raw_logits", "_embeddings"]


@pytest.mark.parametrize(
    "variant, state, outputs",
    [
        ("input_conditioned", GATED_STATE, GATED_OUTPUTS),
        ("mixture_of_experts", GATED_STATE, GATED_OUTPUTS),
        (
            "mask_guided",
            {"heads", "routing", "mask_predictor", "moving_mean"},
            ["left_bright", "unlabelled", "age_group", "_logits", "_embeddings", "_group_masks"],
        ),
    ],
)
def test_model_fits_and_round_trips_under_jax(variant, state, outputs, tmp_path):
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
        [sys.executable, str(SCRIPT), str(tmp_path), variant],
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
    # Every kind of state moved: heads; gates, router or group fusion;
    # correlation C (trained through compute_loss), the center-loss centers
    # (updated by the layer inside compute_loss), or
    # the mask predictor (through the mask loss); a moving mean.
    assert report["changed"] == {k: True for k in report["changed"]}
    assert set(report["changed"]) == state
    assert report["reloaded_class"] == ("MaskGuidedMultiTaskModel" if variant == "mask_guided" else "GatedMultiTaskModel")
    assert report["output_keys"] == sorted(outputs)
    if variant == "mask_guided":
        assert report["mask_loss"] > 0  # the mask loss takes part in the step
    assert max(report["max_diff"].values()) == 0.0, report["max_diff"]
    # A refused or interrupted call leaves the trained model whole (it emptied every variable).
    assert report["survives"] == {k: True for k in report["survives"]} and len(report["survives"]) == 6
    # A SavedModel is a TensorFlow graph: refused up front, not a JAX TypeError from inside Keras.
    assert "export under KERAS_BACKEND=tensorflow" in report["export_refused"]
