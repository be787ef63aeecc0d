"""Shared test set-up: quiet TensorFlow, fixed seeds, the real-data location."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("TFFACE_DATA_DIR", REPO.parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data():
    """The real data folder; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(0)


def pytest_unconfigure(config):
    # pytest then runs gc.collect() 5 times over the worker's heap (600k+
    # objects, ~0.3 s each, more late in the suite). xdist's execnet sends a
    # worker still busy 5 s after it was told to stop a SIGINT, which landed
    # in JAX's gc callback: "Exception ignored in: _xla_gc_callback". The
    # process is ending: its objects need no collection.
    import gc

    gc.freeze()
