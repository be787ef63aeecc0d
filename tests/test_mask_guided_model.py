"""Mask-guided model (MGMTN): mask predictor, masked pooling, fusion, model."""

import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from harness import randomize_weights
from harness import run_layer_test

from tfface.config import ConfigError
from tfface.config import ModelConfig
from tfface.layers.group_global_fusion import GroupGlobalFusion
from tfface.layers.masked_average_pooling import MaskedAveragePooling
from tfface.models.mask_guided_model import MaskGuidedMultiTaskModel
from tfface.models.mask_guided_model import landmark_mask_variant
from tfface.models.mask_predictor import build_mask_predictor
from tfface.models.mask_predictor import mask_iou
from tfface.models.mask_predictor import pretrain_mask_predictor
from tfface.schema import GROUPS
from tfface.schema import Schema
from tfface.schema import Task

SIZE = 32
MASK = SIZE // 4


def tiny_config(**overrides):
    values = dict(
        type="mask_guided",
        image_size=SIZE,
        backbone_widths=(8, 16, 32, 64),
        mask_channels=(8, 16, 32),
        embedding_dim=16,
        dropout=0.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def tiny_schema():
    return Schema(
        [
            Task("Smiling", group="mouth"),
            Task("Eyeglasses", group="eyes"),
            Task("Bangs", group="hair"),
            Task("gender", classes=("female", "male"), group="whole_face"),
            Task("age_group", kind="multiclass", classes=("young", "mid", "old"), group="whole_face"),
        ],
        name="tiny",
    )


def images(n, seed=0, size=SIZE):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def to_numpy(outputs):
    return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}


def labelled_batches(n=48, batch=16, seed=0):
    """Labels tied to image statistics so there is something to learn; some -1."""
    rng = np.random.default_rng(seed)
    x = images(n, seed)
    brightness = x.mean(axis=(1, 2, 3))
    red = x[..., 0].mean(axis=(1, 2)) - x[..., 2].mean(axis=(1, 2))
    smiling = (brightness > np.median(brightness)).astype("float32")
    y = {
        "Smiling": smiling,
        "Eyeglasses": (red > 0).astype("float32"),
        "Bangs": np.where(rng.random(n) < 0.5, -1.0, smiling).astype("float32"),
        "gender": 1.0 - smiling,
        "age_group": np.where(rng.random(n) < 0.3, -1, (red > 0) + smiling).astype("int32"),
        "_group_masks": (rng.random((n, MASK, MASK, len(GROUPS))) < 0.3).astype("float32"),
        "_has_landmarks": (rng.random(n) < 0.8).astype("float32"),
    }
    return tf.data.Dataset.from_tensor_slices(({"image": x}, y)).batch(batch)


# --- mask predictor -------------------------------------------------------------


def test_mask_predictor_shapes_and_range():
    predictor = build_mask_predictor(SIZE, channels=(8, 16, 32))
    masks = keras.ops.convert_to_numpy(predictor(images(2)))
    assert masks.shape == (2, MASK, MASK, len(GROUPS))
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    assert masks.std() > 0  # not a constant map


def test_mask_predictor_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by 16"):
        build_mask_predictor(40, channels=(8, 16, 32))
    with pytest.raises(ValueError, match=">= 2 positive widths"):
        build_mask_predictor(32, channels=(8,))


def test_mask_iou():
    truth = np.zeros((1, 4, 4, 2), "float32")
    truth[0, :2, :, 0] = 1  # 8 pixels
    pred = np.zeros_like(truth)
    pred[0, :1, :, 0] = 0.9  # 4 of them
    # group 0: 4/8; group 1 empty in both: 1.
    assert float(mask_iou(truth, pred)) == pytest.approx(0.75)
    assert float(mask_iou(truth, np.zeros_like(truth))) == pytest.approx(0.5)


# --- layers -----------------------------------------------------------------------


def _numpy_masked_pool(features, masks):
    b, h, w, c = features.shape
    _, mh, mw, g = masks.shape
    small = masks.reshape(b, h, mh // h, w, mw // w, g).mean(axis=(2, 4))
    out = np.zeros((b, g, c))
    for i in range(b):
        for j in range(g):
            weight = small[i, :, :, j]
            out[i, j] = (weight[..., None] * features[i]).sum(axis=(0, 1)) / (weight.sum() + 1e-6)
    return out


def test_masked_average_pooling_matches_numpy():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    masks = rng.random((2, 8, 8, 5)).astype("float32")
    masks[1, :, :, 2] = 0.0  # an empty mask pools to zero
    pooled = keras.ops.convert_to_numpy(MaskedAveragePooling()([features, masks]))
    assert pooled.shape == (2, 5, 3)
    np.testing.assert_allclose(pooled, _numpy_masked_pool(features, masks), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled[1, 2], 0.0)
    # A hard mask selecting one feature pixel returns exactly that pixel.
    hard = np.zeros((2, 8, 8, 1), "float32")
    hard[:, 2:4, 6:8, 0] = 1.0  # feature pixel (1, 3)
    picked = keras.ops.convert_to_numpy(MaskedAveragePooling()([features, hard]))
    np.testing.assert_allclose(picked[:, 0], features[:, 1, 3], rtol=1e-5)


def test_masked_average_pooling_is_flip_invariant():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(3, 4, 4, 6)).astype("float32")
    masks = rng.random((3, 16, 16, 8)).astype("float32")
    layer = MaskedAveragePooling()
    pooled = keras.ops.convert_to_numpy(layer([features, masks]))
    flipped = keras.ops.convert_to_numpy(layer([features[:, :, ::-1], masks[:, :, ::-1]]))
    np.testing.assert_allclose(flipped, pooled, rtol=1e-5, atol=1e-6)
    # Not trivially invariant: flipping only the features changes the result.
    half = keras.ops.convert_to_numpy(layer([features[:, :, ::-1], masks]))
    assert np.abs(half - pooled).max() > 1e-3


def test_masked_average_pooling_non_integer_resize():
    features = np.ones((1, 3, 3, 2), "float32")
    masks = np.random.default_rng(3).random((1, 8, 8, 4)).astype("float32")
    pooled = keras.ops.convert_to_numpy(MaskedAveragePooling()([features, masks]))
    np.testing.assert_allclose(pooled, 1.0, rtol=1e-5)  # average of a constant


@pytest.mark.parametrize("fusion", ["group_global", "group", "global"])
def test_group_global_fusion_layer(fusion, tmp_path):
    rng = np.random.default_rng(5)
    groups = rng.normal(size=(2, 3, 5)).astype("float32")
    global_feature = rng.normal(size=(2, 4)).astype("float32")
    inputs = {"group_global": [groups, global_feature], "group": groups, "global": global_feature}[fusion]
    params = {"group_global": 3 * 5 * 6 + 4 * 18, "group": 3 * 5 * 6, "global": 4 * 18}[fusion] + 3 * 6
    run_layer_test(
        GroupGlobalFusion,
        dict(num_groups=3, units=6, fusion=fusion),
        inputs,
        expected_output_shape=(2, 3, 6),
        num_trainable_params=params,
        num_non_trainable_params=0,
        tmp_path=tmp_path,
        list_input=fusion == "group_global",
    )


def test_masked_average_pooling_layer(tmp_path):
    rng = np.random.default_rng(6)
    features = rng.normal(size=(2, 4, 4, 5)).astype("float32")
    masks = rng.uniform(size=(2, 8, 8, 3)).astype("float32")
    run_layer_test(
        MaskedAveragePooling,
        dict(epsilon=1e-5),
        [features, masks],
        expected_output_shape=(2, 3, 5),
        num_trainable_params=0,
        num_non_trainable_params=0,
        tmp_path=tmp_path,
        list_input=True,
    )


def test_group_global_fusion_equals_dense_on_concat():
    rng = np.random.default_rng(4)
    groups = rng.normal(size=(2, 3, 5)).astype("float32")
    global_feature = rng.normal(size=(2, 4)).astype("float32")
    layer = GroupGlobalFusion(3, 6, fusion="group_global")
    fused = keras.ops.convert_to_numpy(layer([groups, global_feature]))
    a = keras.ops.convert_to_numpy(layer.group_kernel)
    b = keras.ops.convert_to_numpy(layer.global_kernel).reshape(4, 3, 6)
    for j in range(3):
        kernel = np.concatenate([a[j], b[:, j]], axis=0)
        expected = np.concatenate([groups[:, j], global_feature], axis=-1) @ kernel
        np.testing.assert_allclose(fused[:, j], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fusion must be one of"):
        GroupGlobalFusion(3, 6, fusion="sum")


# --- model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())


def test_model_outputs(model):
    out = model({"image": images(2)})
    assert out["_group_masks"].shape == (2, MASK, MASK, len(GROUPS))
    assert out["_embeddings"].shape == (2, 5, 16)
    assert out["_logits"].shape == (2, 1 + 1 + 1 + 1 + 3)
    assert out["Smiling"].shape == (2,) and out["age_group"].shape == (2, 3)
    assert "_raw_logits" not in out
    emb = keras.ops.convert_to_numpy(out["_embeddings"])
    # gender and age_group share the whole_face group feature; Smiling does not.
    np.testing.assert_array_equal(emb[:, 3], emb[:, 4])
    assert np.abs(emb[:, 0] - emb[:, 3]).max() > 0


def test_variable_paths_are_unique():
    # The mask predictor and the small_cnn backbone both have a "stem_conv";
    # repeated paths made get_state_tree (JAX's stateless training) fail.
    model = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())
    model.compile()
    paths = [v.path for v in model.variables]
    assert len(paths) == len(set(paths))
    assert "mask_predictor/stem_conv/kernel" in paths
    tree = model.get_state_tree()
    assert "mask_predictor" in tree["trainable_variables"]


def test_global_fusion_has_no_masks_and_landmark_masks_need_groups():
    baseline = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config(fusion="global"))
    assert "_group_masks" not in baseline({"image": images(1)})
    assert not any(layer.name == "mask_predictor" for layer in baseline.layers)
    with pytest.raises(ConfigError, match="use_landmark_masks"):
        MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config(fusion="global", use_landmark_masks=True))


@pytest.mark.parametrize("use_landmark_masks", [False, True])
def test_save_load_round_trip(tmp_path, use_landmark_masks):
    fusion = "group" if use_landmark_masks else "group_global"
    config = tiny_config(use_landmark_masks=use_landmark_masks, fusion=fusion)
    # Every weight drawn at random, BN statistics included: a weight left at
    # its initial value would reload equal even if it were never saved.
    net = randomize_weights(MaskGuidedMultiTaskModel(schema=tiny_schema(), config=config), kernel_scale=1.0)
    net.compile()
    x = {"image": images(3)}
    if use_landmark_masks:
        x["group_masks"] = np.random.default_rng(5).random((3, MASK, MASK, len(GROUPS))).astype("float32")
    path = tmp_path / "mgmtn.keras"
    net.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MaskGuidedMultiTaskModel)
    assert loaded.model_config == net.model_config
    before, after = to_numpy(net(x)), to_numpy(loaded(x))
    assert set(before) == set(after)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6, atol=1e-6)
    assert [w.path for w in loaded.weights] == [w.path for w in net.weights]
    for restored, original in zip(loaded.weights, net.weights):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(original), err_msg=original.path)


def test_landmark_variant_with_predicted_masks_matches(model):
    variant = landmark_mask_variant(model)
    assert variant.model_config.use_landmark_masks
    x = images(2, seed=6)
    out = to_numpy(model({"image": x}))
    same = to_numpy(variant({"image": x, "group_masks": out["_group_masks"]}))
    np.testing.assert_allclose(same["_logits"], out["_logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(same["_embeddings"], out["_embeddings"], rtol=1e-5, atol=1e-6)
    # The untrained predictor's masks are ~0.5 everywhere; a corner mask pools elsewhere.
    corner = np.zeros_like(out["_group_masks"])
    corner[:, : MASK // 2, : MASK // 2] = 1.0
    other = to_numpy(variant({"image": x, "group_masks": corner}))
    change = np.abs(other["_embeddings"] - out["_embeddings"]).max()
    assert change > 0.01 * np.abs(out["_embeddings"]).max()
    # predict_tasks has no way to take the masks: it says what to call instead.
    with pytest.raises(ValueError, match=r"also takes \['group_masks'\].*predict_faces"):
        variant.predict_tasks(x)


def test_gated_only_options_are_refused():
    for overrides in (dict(gate="mixture_of_experts"), dict(gate_bottleneck=8)):
        with pytest.raises(ConfigError, match="options of the gated model"):
            MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config(**overrides))


def test_fit_with_frozen_predictor_decreases_loss():
    net = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config(mask_trainable=False))
    predictor = net.get_layer("mask_predictor")
    assert predictor.trainable_weights == []
    frozen = {id(w) for w in predictor.weights}
    assert not any(id(w) in frozen for w in net.trainable_weights)
    before = [w.copy() for w in predictor.get_weights()]
    net.compile(learning_rate=3e-3)
    history = net.fit(labelled_batches(), epochs=6, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0]
    for b, a in zip(before, predictor.get_weights()):
        np.testing.assert_array_equal(a, b)  # BN statistics included


def test_mask_loss_reaches_trainable_predictor(model):
    x, y = next(iter(labelled_batches(n=8, batch=8)))
    predictor_weights = model.get_layer("mask_predictor").trainable_weights
    assert predictor_weights
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = model.compute_loss(x, y, y_pred)
    without_masks = {k: v for k, v in y.items() if k != "_group_masks"}
    with pytest.warns(UserWarning, match="masks get no supervision"):  # a trainable predictor without mask labels
        task_only = model.compute_loss(x, without_masks, y_pred)
    assert float(loss) > float(task_only)  # the mask term is added
    grads = tape.gradient(loss, predictor_weights)
    assert all(g is not None for g in grads)
    assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 0


# --- mask learning -------------------------------------------------------------------


def blob_data(n, seed, size=64):
    """Dark noisy images with a bright disc; the disc is group 0's mask."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size) + 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    x = rng.uniform(0, 90, (n, size, size, 3)).astype("float32")
    masks = np.zeros((n, size // 4, size // 4, len(GROUPS)), "float32")
    for i in range(n):
        cx, cy = rng.uniform(14, size - 14, 2)
        radius = rng.uniform(7, 12)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        x[i][disc] = rng.uniform(170, 255, 3)
        masks[i, :, :, 0] = disc.reshape(size // 4, 4, size // 4, 4).mean(axis=(1, 3)) >= 0.5
    return x, masks


def test_pretrained_mask_predictor_learns_blob_masks_and_freezes():
    start = time.perf_counter()
    net = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config(image_size=64))
    x, masks = blob_data(256, seed=0)
    y = {"_group_masks": masks, "_has_landmarks": np.ones(len(x), "float32")}
    train = tf.data.Dataset.from_tensor_slices(({"image": x}, y)).shuffle(256, seed=0).batch(32)
    history = pretrain_mask_predictor(net, train, epochs=4, learning_rate=2e-2, verbose=0)
    assert history.history["mask_iou"][-1] > history.history["mask_iou"][0]
    predictor = net.get_layer("mask_predictor")
    assert predictor.trainable_weights == []  # frozen afterwards
    assert not net.model_config.mask_trainable  # and saved as frozen
    test_x, test_masks = blob_data(64, seed=1)
    predicted = keras.ops.convert_to_numpy(predictor(test_x))
    blob_iou = float(mask_iou(test_masks[..., :1], predicted[..., :1]))
    blank_iou = float(mask_iou(test_masks[..., :1], np.zeros_like(predicted[..., :1])))
    assert blank_iou == 0.0
    assert blob_iou > 0.5, (blob_iou, history.history)
    # The full model's mask output is the predictor's.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(net({"image": test_x[:2]})["_group_masks"]), predicted[:2], atol=1e-6
    )
    assert time.perf_counter() - start < 60


def test_pretrain_needs_group_masks():
    predictor = build_mask_predictor(SIZE, channels=(8, 16, 32))
    no_masks = tf.data.Dataset.from_tensor_slices(
        ({"image": images(4)}, {"Smiling": np.ones(4, "float32")})
    ).batch(4)
    with pytest.raises(ValueError, match="_group_masks"):
        pretrain_mask_predictor(predictor, no_masks, epochs=1, verbose=0)


def test_fitting_a_trainable_predictor_without_mask_labels_warns_once():
    net = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())
    net.compile()
    x, y = images(8), {"Smiling": np.ones(8, "float32")}
    with pytest.warns(UserWarning, match="masks get no supervision") as caught:
        net.fit({"image": x}, y, epochs=2, batch_size=4, verbose=0)
    assert sum("no supervision" in str(w.message) for w in caught) == 1
    frozen = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())
    frozen.get_layer("mask_predictor").trainable = False
    frozen.compile()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no supervision")
        frozen.fit({"image": x}, y, epochs=1, batch_size=4, verbose=0)


def test_pretraining_on_images_without_landmarks_is_refused_not_frozen():
    # The real data has no landmarks until annotated: the loss was 0 for
    # every step, and an untrained predictor was frozen into the model.
    net = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())
    y = {"_group_masks": np.zeros((8, MASK, MASK, len(GROUPS)), "float32"), "_has_landmarks": np.zeros(8, "float32")}
    unlabelled = tf.data.Dataset.from_tensor_slices(({"image": images(8)}, y)).batch(4)
    with pytest.raises(ValueError, match="no training image had landmarks"):
        pretrain_mask_predictor(net, unlabelled, epochs=1, verbose=0)
    assert net.get_layer("mask_predictor").trainable and net.model_config.mask_trainable


@pytest.mark.slow
def test_short_training_on_synthetic_faces_learns_masks_and_attributes():
    """Synthetic faces know their landmarks, so their group masks supervise
    the mask predictor; a short run must beat a blank mask and chance."""
    from tfface.data.pipeline import make_dataset
    from tfface.data.splits import split_source
    from tfface.data.synthetic import generate_synthetic_faces
    from tfface.models.mask_predictor import mask_iou
    from tfface.schema import get_schema

    keras.utils.set_random_seed(0)  # the thresholds below hold with margin, not for every draw
    schema = get_schema("synthetic")
    parts = split_source(generate_synthetic_faces(600, image_size=64, seed=3), val_fraction=0.2)
    train = make_dataset([parts["train"]], schema, 64, batch_size=32, training=True, with_masks=True, seed=0)
    val = make_dataset([parts["val"]], schema, 64, batch_size=64, with_masks=True)
    model = MaskGuidedMultiTaskModel(
        schema=schema,
        config=ModelConfig(
            type="mask_guided", image_size=64, backbone_widths=(16, 32, 64, 128),
            mask_channels=(8, 16, 32), embedding_dim=32, mask_loss_weight=1.0,
        ),
    )
    model.compile(learning_rate=3e-3)
    model.fit(train, epochs=10, verbose=0)
    predicted, blank = [], []
    for x, y in val:
        masks = model.predict_on_batch(x)["_group_masks"]
        predicted.append(float(mask_iou(y["_group_masks"], masks, y["_has_landmarks"])))
        blank.append(float(mask_iou(y["_group_masks"], np.zeros_like(masks), y["_has_landmarks"])))
    # Seen: 0.31 against 0.004 for a blank mask.
    assert np.mean(predicted) > 0.2 > 10 * np.mean(blank)
    # Seen: 0.60; chance is 0.5.
    assert model.evaluate(val, return_dict=True, verbose=0)["mean_balanced_accuracy"] > 0.54


def test_a_frozen_backbone_stays_frozen_through_a_keras_round_trip(tmp_path):
    # The model is rebuilt from its ModelConfig on loading: the layers a user
    # froze are recorded by path (the mask predictor and the backbone share
    # layer names), and the optimizer state saved with it still loads.
    import warnings

    model = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())
    backbone = next(layer for layer in model.layers if "backbone" in layer.name)
    backbone.trainable = False
    model.compile()
    model.fit(labelled_batches(), epochs=1, verbose=0)
    assert model.get_config()["frozen_layers"] == [backbone.name]
    path = tmp_path / "frozen.keras"
    model.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.saving.load_model(path)
    assert not loaded.get_layer(backbone.name).trainable
    assert len(loaded.trainable_weights) == len(model.trainable_weights)
    assert not [w for w in caught if "Skipping variable loading for optimizer" in str(w.message)]
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    np.testing.assert_allclose(
        loaded.predict_tasks(images(2))["Smiling"], model.predict_tasks(images(2))["Smiling"], rtol=1e-5, atol=1e-6
    )
    # An unfrozen model records nothing: its config is as before.
    assert "frozen_layers" not in MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config()).get_config()


def test_a_dataset_of_another_image_size_is_named_before_tracing():
    model = MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())
    wrong = tf.data.Dataset.from_tensor_slices(images(4, size=48)).batch(2)
    with pytest.raises(ValueError, match=r"must have shape \(B, 32, 32, 3\) .*got \(None, 48, 48, 3\)"):
        model.predict(wrong, verbose=0)
    model.compile()
    with pytest.raises(ValueError, match=r"must have shape \(B, 32, 32, 3\)"):
        model.evaluate(tf.data.Dataset.from_tensor_slices(({"image": images(4, size=48)}, {"Smiling": np.ones(4)})).batch(2), verbose=0)
    unbatched = tf.data.Dataset.from_tensor_slices(images(4))
    with pytest.raises(ValueError, match=r"single images of shape \(32, 32, 3\): batch it first"):
        model.predict(unbatched, verbose=0)


def test_options_of_the_gated_model_are_named_not_silently_ignored(tmp_path):
    with pytest.warns(UserWarning, match=r"model.gate, model.center_loss_weight: options of the gated model"):
        model = MaskGuidedMultiTaskModel(
            schema=tiny_schema(), config=tiny_config(gate="input_conditioned", center_loss_weight=1.0)
        )
    model.save(tmp_path / "m.keras")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, when the model was made: not on every load
        keras.saving.load_model(tmp_path / "m.keras")
        MaskGuidedMultiTaskModel(schema=tiny_schema(), config=tiny_config())
