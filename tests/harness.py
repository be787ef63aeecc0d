"""Reusable checks for custom layers and models (after keras-hub's TestCase).

`run_layer_test` builds a layer, calls it, checks its output shape and weight
counts, round-trips its config (get_config / from_config and Keras
serialization) and saves it inside a tiny functional model to `.keras`,
comparing outputs after reload. `run_model_saving_test` does the `.keras`
round trip for a whole model. Both compare numbers, not just "it loaded".
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np

import keras
from keras import ops


def to_numpy(tree):
    """Tensors (possibly nested in dicts/lists) -> numpy."""
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    return ops.convert_to_numpy(tree)


def assert_allclose_tree(actual, expected, atol=1e-6, rtol=1e-6):
    """Same structure (dict keys, list lengths) and close numbers."""
    actual, expected = to_numpy(actual), to_numpy(expected)
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"expected a dict, got {type(actual).__name__}"
        assert sorted(actual) == sorted(expected), f"keys differ: {sorted(actual)} vs {sorted(expected)}"
        for key in expected:
            try:
                assert_allclose_tree(actual[key], expected[key], atol=atol, rtol=rtol)
            except AssertionError as e:
                raise AssertionError(f"[{key!r}] {e}") from None
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"lengths differ: {len(actual)} vs {len(expected)}"
        for i, (a, b) in enumerate(zip(actual, expected)):
            try:
                assert_allclose_tree(a, b, atol=atol, rtol=rtol)
            except AssertionError as e:
                raise AssertionError(f"[{i}] {e}") from None
    else:
        np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def count_params(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def assert_weight_counts(
    layer,
    num_trainable_weights=None,
    num_non_trainable_weights=None,
    num_trainable_params=None,
    num_non_trainable_params=None,
):
    """Exact numbers of weight variables and of scalars in them."""
    checks = [
        ("trainable weights", num_trainable_weights, len(layer.trainable_weights)),
        ("non-trainable weights", num_non_trainable_weights, len(layer.non_trainable_weights)),
        ("trainable params", num_trainable_params, count_params(layer.trainable_weights)),
        ("non-trainable params", num_non_trainable_params, count_params(layer.non_trainable_weights)),
    ]
    for what, expected, actual in checks:
        if expected is not None:
            assert actual == expected, f"{layer.name}: expected {expected} {what}, got {actual}"


def _as_list(inputs):
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _call(layer, inputs, call_kwargs, list_input=False):
    tensors = [ops.convert_to_tensor(x) for x in _as_list(inputs)]
    return layer(tensors, **call_kwargs) if list_input else layer(*tensors, **call_kwargs)


def _copy_weights(source, target):
    target.set_weights(source.get_weights())


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    expected_output_shape=None,
    num_trainable_weights=None,
    num_non_trainable_weights=None,
    num_trainable_params=None,
    num_non_trainable_params=None,
    call_kwargs=None,
    tmp_path=None,
    atol=1e-6,
    list_input=False,
):
    """Checks one custom layer end to end and returns its eager output.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_data: one numpy array, or a list for layers called with
            several positional inputs (e.g. `CenterLoss(embeddings, labels)`).
        expected_output_shape: the full output shape, batch included.
        num_*: exact weight counts (see `assert_weight_counts`).
        call_kwargs: extra call arguments (e.g. `training=False`).
        tmp_path: where to write the `.keras` file; None skips that part.
        list_input: the layer takes its inputs as one list (e.g.
            `MaskedAveragePooling([features, masks])`), not positionally.
    """
    call_kwargs = dict(call_kwargs or {})
    inputs = _as_list(input_data)

    # Build + call.
    layer = layer_cls(**init_kwargs)
    output = _call(layer, inputs, call_kwargs, list_input)
    assert layer.built, f"{layer_cls.__name__} is not built after its first call"
    if expected_output_shape is not None:
        assert tuple(output.shape) == tuple(expected_output_shape), (
            f"{layer_cls.__name__}: output shape {tuple(output.shape)} != {tuple(expected_output_shape)}"
        )
    assert_weight_counts(
        layer,
        num_trainable_weights,
        num_non_trainable_weights,
        num_trainable_params,
        num_non_trainable_params,
    )
    output = to_numpy(output)
    assert np.all(np.isfinite(output)), f"{layer_cls.__name__} returned non-finite values"

    # compute_output_shape agrees with the real output (batch dim excluded).
    shapes = [tuple(np.shape(x)) for x in inputs]
    predicted = layer.compute_output_shape(shapes) if list_input else layer.compute_output_shape(*shapes)
    assert tuple(predicted)[1:] == tuple(output.shape)[1:], (
        f"{layer_cls.__name__}.compute_output_shape gives {predicted}, call gives {output.shape}"
    )

    # get_config / from_config: same config, same outputs with the same weights.
    config = layer.get_config()
    for key, value in init_kwargs.items():
        got = config.get(key)
        if isinstance(value, (list, tuple)):
            got, value = list(got), list(value)
        assert got == value, f"get_config()[{key!r}] = {got!r}, constructed with {value!r}"
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config, "from_config(get_config()) changed the config"
    _call(clone, inputs, call_kwargs, list_input)  # builds the clone
    _copy_weights(layer, clone)
    assert_allclose_tree(_call(clone, inputs, call_kwargs, list_input), output, atol=atol)

    # Keras serialization finds the registered class by name.
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"tfface>{layer_cls.__name__}", serialized["registered_name"]
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is layer_cls and revived.get_config() == config

    if tmp_path is not None:
        run_layer_saving_test(layer, inputs, call_kwargs, tmp_path, atol=atol, list_input=list_input)
    return output


def run_layer_saving_test(layer, inputs, call_kwargs, tmp_path, atol=1e-6, list_input=False):
    """Saves `layer` inside a tiny functional model and compares after reload.

    Weights are first perturbed (a fresh layer often has all-zero or constant
    weights, which would hide a weight that is not saved).
    """
    inputs = _as_list(inputs)
    symbolic = [
        keras.Input(shape=np.shape(x)[1:], dtype=str(np.asarray(x).dtype), name=f"input_{i}")
        for i, x in enumerate(inputs)
    ]
    outputs = layer(symbolic, **call_kwargs) if list_input else layer(*symbolic, **call_kwargs)
    model = keras.Model(symbolic, outputs)
    rng = np.random.default_rng(1)
    for weight in layer.weights:
        value = ops.convert_to_numpy(weight)
        weight.assign((value + rng.normal(0.0, 0.1, value.shape)).astype(value.dtype))
    feed = [np.asarray(x) for x in inputs]
    expected = to_numpy(model(feed, training=False))
    path = str(tmp_path / f"{layer.name}_in_model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    reloaded_layer = reloaded.get_layer(layer.name)
    assert type(reloaded_layer) is type(layer)
    assert_allclose_tree(list(reloaded_layer.weights), list(layer.weights))
    assert_allclose_tree(reloaded(feed, training=False), expected, atol=atol)
    return reloaded


def run_model_saving_test(model, input_data, tmp_path, atol=1e-6, extra_weights=()):
    """`.keras` round trip of a whole model: same class, config, weights and
    predictions. `extra_weights` are attribute paths (e.g. "center_loss.centers")
    of state outside the functional graph that must survive too."""
    path = str(tmp_path / f"{model.name}.keras")
    expected = to_numpy(model(input_data, training=False))
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded) is type(model), f"reloaded as {type(reloaded).__name__}"
    assert reloaded.get_config() == model.get_config(), "config changed in the round trip"
    assert [w.path for w in reloaded.weights] == [w.path for w in model.weights]
    assert_allclose_tree(list(reloaded.weights), list(model.weights))
    assert_allclose_tree(reloaded(input_data, training=False), expected, atol=atol)
    for dotted in extra_weights:
        original, restored = model, reloaded
        for part in dotted.split("."):
            original, restored = getattr(original, part), getattr(restored, part)
        assert_allclose_tree(restored, original)
    return reloaded


def randomize_weights(model, seed=0, kernel_scale=2.0):
    """Draws every float weight of `model` at random, batch-norm statistics
    included, and returns the model.

    An untrained model answers almost the same for any input, so a test
    cannot tell which input an answer came from; and a weight still at its
    initial value reloads equal even if it was never saved. Kernels are drawn
    `kernel_scale` times wider than He's so that answers depend on the input.
    """
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        if not str(weight.dtype).startswith(("float", "bfloat")):
            continue
        shape = tuple(weight.shape)
        if len(shape) >= 2:
            value = rng.normal(0.0, kernel_scale / np.sqrt(max(1, int(np.prod(shape[:-1])))), shape)
        elif weight.path.endswith(("moving_variance", "gamma")):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        weight.assign(value.astype(str(weight.dtype)))
    return model


@contextlib.contextmanager
def small_disk(folder, size: str):
    """`folder` as a tmpfs of `size` (e.g. "64k") for the block, to fill a
    disk for real; skips the test where mounting is not allowed (not root)."""
    import pytest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs a tmpfs of its own (mount, as root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def pil_encoded(image, fmt, mode=None, **options) -> bytes:
    """A PIL image, or an (H, W, 3) uint8 array, encoded by PIL (e.g. as a
    GIF or a 1-bit BMP, `mode="1"`); `options` go to `Image.save`."""
    import io

    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rle8_bmp(width=4, height=3) -> bytes:
    """An RLE8-compressed 8-bit BMP (PIL reads them, does not write them):
    every row `width` pixels of palette entry 7."""
    import struct

    from PIL import Image

    plain = bytearray(pil_encoded(Image.new("L", (width, height)), "BMP"))  # 8 bits, grey palette
    offset = struct.unpack_from("<I", plain, 10)[0]
    rle = b"".join(bytes([width, 7, 0, 0]) for _ in range(height)) + bytes([0, 1])
    data = plain[:offset] + rle
    struct.pack_into("<I", data, 2, len(data))
    struct.pack_into("<II", data, 30, 1, len(rle))  # compression BI_RLE8, image size
    return bytes(data)


def log_syncs_and_moves(monkeypatch, move: str) -> list:
    """Records, in order, ("sync", path) for each `os.fsync` and (move, source,
    target) for each `os.<move>` ("rename" or "replace"); both still run."""
    import os

    events = []
    real_fsync, real_move = os.fsync, getattr(os, move)
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, move, lambda a, b: events.append((move, str(a), str(b))) or real_move(a, b))
    return events
