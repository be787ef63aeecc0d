"""Trains and round-trips a tfface model under the JAX backend.

Run by tests/test_jax_backend.py in a subprocess with KERAS_BACKEND=jax (the
backend is fixed at import time, so it cannot share the pytest process).
Prints one JSON line with what it measured; exits non-zero on any failure.

    KERAS_BACKEND=jax python tests/jax_train_step.py OUT_DIR [GATE | mask_guided]
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tfface.config import ModelConfig  # noqa: E402
from tfface.models import GatedMultiTaskModel  # noqa: E402
from tfface.models import MaskGuidedMultiTaskModel  # noqa: E402
from tfface.schema import Schema, Task  # noqa: E402

SCHEMA = Schema(
    [
        Task("left_bright", group="eyes"),
        Task("unlabelled", group="hair"),
        Task("age_group", kind="multiclass", classes=("young", "middle", "old")),
    ]
)


def toy_batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = {
        "left_bright": np.array([1, 0, -1, 1, 0, 1, -1, 0], "float32"),
        "unlabelled": np.full((8,), -1, "float32"),
        "age_group": np.array([0, 2, 1, -1, 2, -1, 0, 1], "int32"),
    }
    return images, labels


def main(out_dir, gate="input_conditioned"):
    if keras.backend.backend() != "jax":
        raise SystemExit(f"expected the jax backend, got {keras.backend.backend()}")
    keras.utils.set_random_seed(0)
    if gate == "mask_guided":
        model, watched, images, labels = mask_guided_case()
    else:
        model, watched, images, labels = gated_case(gate)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05))
    before = {k: keras.ops.convert_to_numpy(v) for k, v in watched.items()}
    history = model.fit({"image": images}, labels, batch_size=4, epochs=1, verbose=0)
    steps = int(model.optimizer.iterations)
    changed = {k: bool(np.any(keras.ops.convert_to_numpy(v) != before[k])) for k, v in watched.items()}

    path = os.path.join(out_dir, "model_jax.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    original = model.predict({"image": images}, verbose=0)
    restored = reloaded.predict({"image": images}, verbose=0)
    max_diff = {k: float(np.max(np.abs(original[k] - restored[k]))) for k in original}
    extra = {}
    try:
        from tfface.export import ExportError
        from tfface.export import export_saved_model
    except ModuleNotFoundError as e:  # a JAX-only machine (the GPU one): export needs TensorFlow
        extra["export_refused"] = str(e)
    else:
        try:
            export_saved_model(model, os.path.join(out_dir, "exports"), "m", warmup_images=[])
            extra["export_refused"] = None
        except ExportError as e:
            extra["export_refused"] = str(e)
    extra["survives"] = survives_refusals(model, images, labels, original)
    if gate == "mask_guided":
        # The mask loss is part of the step's loss: without the mask labels
        # the same prediction costs less.
        y_pred = model({"image": images}, training=False)
        plain = {k: v for k, v in labels.items() if not k.startswith("_")}
        extra["mask_loss"] = float(
            keras.ops.convert_to_numpy(model.compute_loss(y=labels, y_pred=y_pred, training=False))
            - keras.ops.convert_to_numpy(model.compute_loss(y=plain, y_pred=y_pred, training=False))
        )

    print(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "loss": [float(v) for v in history.history["loss"]],
                "steps": steps,
                "changed": changed,
                "max_diff": max_diff,
                "output_keys": sorted(original),
                "reloaded_class": type(reloaded).__name__,
                **extra,
            }
        )
    )


class StopAfterFirstBatch(keras.callbacks.Callback):
    def on_test_batch_end(self, batch, logs=None):
        raise KeyboardInterrupt

    on_train_batch_end = on_predict_batch_end = on_test_batch_end


def survives_refusals(model, images, labels, original):
    """Keras's JAX trainer empties the variables while fit, evaluate and
    predict run; a call refused in its first step (while the step compiles)
    left them empty, breaking the trained model for good. For each failed
    call: whether the model afterwards predicts what it did before (fit
    stopped after a step predicts what that step left, finite)."""
    failing = {
        "fit_sample_weight": lambda: model.fit({"image": images}, labels, sample_weight=np.ones(8), verbose=0),
        "evaluate_unknown_task": lambda: model.evaluate({"image": images}, dict(labels, smiling=labels["left_bright"]), verbose=0),
        "evaluate_no_labels": lambda: model.evaluate({"image": images}, verbose=0),
        "evaluate_interrupted_after_a_step": lambda: model.evaluate(
            {"image": images}, labels, batch_size=4, verbose=0, callbacks=[StopAfterFirstBatch()]
        ),
        "predict_interrupted_after_a_step": lambda: model.predict(
            {"image": images}, batch_size=4, verbose=0, callbacks=[StopAfterFirstBatch()]
        ),
        "fit_interrupted_after_a_step": lambda: model.fit(
            {"image": images}, labels, batch_size=4, verbose=0, callbacks=[StopAfterFirstBatch()]
        ),
    }
    survived = {}
    for name, call in failing.items():
        try:
            call()
            survived[name] = "not refused"
            continue
        except (ValueError, KeyboardInterrupt):
            pass
        try:
            now = model.predict({"image": images}, verbose=0)
        except Exception as e:  # the defect: "'NoneType' object is not callable"
            survived[name] = f"{type(e).__name__}: {e}"
            continue
        if name.startswith("fit_interrupted"):
            survived[name] = all(np.isfinite(v).all() for v in now.values())
        else:
            survived[name] = all(np.array_equal(now[k], original[k]) for k in original)
    return survived


def mask_guided_case():
    """Masks supervised from labels (the mask loss), group features pooled
    under the predicted masks and fused with the global one."""
    config = ModelConfig(
        type="mask_guided",
        image_size=32,
        backbone_widths=(8, 16, 32, 64),
        mask_channels=(8, 16, 32),
        embedding_dim=16,
        mask_loss_weight=1.0,
    )
    model = MaskGuidedMultiTaskModel(schema=SCHEMA, config=config)
    images, labels = toy_batch()
    rng = np.random.default_rng(1)
    labels["_group_masks"] = (rng.uniform(size=(8, 8, 8, 8)) > 0.7).astype("float32")
    labels["_has_landmarks"] = np.ones((8,), "float32")
    watched = {
        "heads": model.get_layer("task_heads").kernel,
        "routing": model.get_layer("group_global_fusion").trainable_weights[0],
        "mask_predictor": model.get_layer("mask_predictor").trainable_weights[0],
        "moving_mean": model.get_layer("fusion_bn").moving_mean,
    }
    return model, watched, images, labels


def gated_case(gate):
    config = ModelConfig(
        image_size=32,
        backbone_widths=(8, 16, 32, 64),
        embedding_dim=16,
        gate=gate,
        gate_hidden=8,
        num_experts=3,
        correlation=True,
        center_loss_weight=0.1,
    )
    model = GatedMultiTaskModel(schema=SCHEMA, config=config)
    images, labels = toy_batch()
    watched = {
        "heads": model.get_layer("task_heads").kernel,
        # What routes the shared feature: the gates' offsets, or the router.
        "routing": (
            model.get_layer("expert_routing").router.kernel
            if gate == "mixture_of_experts"
            else model.get_layer("task_gate").task_offsets
        ),
        "correlation": model.get_layer("correlation").correlation,
        "centers": model.center_loss.centers,
        "moving_mean": model.get_layer("correlation").moving_mean,
    }
    return model, watched, images, labels


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".", *sys.argv[2:3])
