"""The gated MTL-CNN: outputs, saving, parameter count, and masked training."""

import dataclasses
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness import assert_allclose_tree
from harness import run_model_saving_test
from harness import to_numpy
import tfface.models
from tfface.config import ModelConfig
from tfface.models import GatedMultiTaskModel
from tfface.schema import Schema, Task

SCHEMA = Schema(
    [
        Task("left_bright"),
        Task("never_labelled"),
        Task("age_group", kind="multiclass", classes=("dark", "medium", "bright")),
    ],
    name="toy",
)


def tiny_config(**overrides):
    values = dict(
        image_size=32,
        backbone_widths=(8, 16, 32, 64),
        embedding_dim=16,
        gate_hidden=8,
        dropout=0.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def toy_data(n, seed):
    """Learnable labels: `left_bright` = the left half is the brighter one;
    `age_group` = overall brightness bin; `never_labelled` is always -1."""
    rng = np.random.default_rng(seed)
    left = rng.integers(0, 2, n)
    bright, dark = rng.uniform(150, 230, n), rng.uniform(20, 100, n)
    images = rng.normal(0, 20, (n, 32, 32, 3))
    images[:, :, :16] += np.where(left, bright, dark)[:, None, None, None]
    images[:, :, 16:] += np.where(left, dark, bright)[:, None, None, None]
    images = np.clip(images, 0, 255).astype("float32")
    labels = {
        "left_bright": left.astype("float32"),
        "never_labelled": np.full(n, -1, "float32"),
        "age_group": np.digitize(images.mean(axis=(1, 2, 3)), [110, 140]).astype("int32"),
    }
    labels["left_bright"][rng.uniform(size=n) < 0.25] = -1
    labels["age_group"][rng.uniform(size=n) < 0.5] = -1
    return images, labels


@pytest.mark.parametrize("correlation", [True, False])
@pytest.mark.parametrize("gate", ["none", "static", "input_conditioned", "mixture_of_experts"])
def test_outputs_and_keras_round_trip(gate, correlation, tmp_path):
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate=gate, correlation=correlation))
    images, _ = toy_data(3, seed=0)
    outputs = to_numpy(model({"image": images}, training=False))
    aux = {"_logits", "_embeddings"} | ({"_raw_logits"} if correlation else set())
    assert set(outputs) == set(SCHEMA.task_names) | aux
    assert model.public_output_names == SCHEMA.task_names
    assert outputs["left_bright"].shape == (3,) and outputs["never_labelled"].shape == (3,)
    assert outputs["age_group"].shape == (3, 3)
    np.testing.assert_allclose(outputs["age_group"].sum(axis=1), 1.0, rtol=1e-5)
    assert outputs["_logits"].shape == (3, 5)
    assert outputs["_embeddings"].shape == (3, 3, 16)
    if gate == "mixture_of_experts":
        routing = "expert_routing"
        assert model.get_layer(routing).num_experts == model.model_config.num_experts
    else:
        routing = "task_gate"
        assert model.get_layer(routing).gate_type == gate
    # Move the tfface layers off their (often zero) initial values, so that a
    # weight missing from the `.keras` file changes the predictions.
    rng = np.random.default_rng(0)
    layers = [model.get_layer(n) for n in (routing, "task_heads")] + [model.center_loss]
    if correlation:
        layers.append(model.get_layer("correlation"))
    for layer in layers:
        for weight in layer.weights:
            value = to_numpy(weight)
            weight.assign(value + rng.normal(0.0, 0.1, value.shape).astype(value.dtype))
    reloaded = run_model_saving_test(
        model, {"image": images}, tmp_path, extra_weights=("center_loss.centers",)
    )
    assert reloaded.schema == SCHEMA
    assert reloaded.model_config == model.model_config


def test_parameter_count_of_a_fixed_tiny_config():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate="static", correlation=True))
    convs = 3 * 3 * (3 * 4 + 4 * 8 + 8 * 8 + 8 * 16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 64 * 64)
    bn_channels = 4 + 8 + 8 + 16 + 16 + 32 + 32 + 64 + 64 + 16  # backbone + projection BN
    gate = 3 * 64  # K * C
    projection = 64 * 16 + 16
    heads = 3 * 16 * 3 + 3 * 3  # padded to the widest task
    correlation = 5 * 5
    centers = 3 * 3 * 16  # K * max classes * D
    trainable = convs + 2 * bn_channels + gate + projection + heads + correlation
    non_trainable = 2 * bn_channels + 5 + centers  # BN moving stats, correlation moving mean, centers
    assert trainable == 75478 and non_trainable == 669  # Model Garden style: the numbers
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == trainable
    assert sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == non_trainable
    assert model.count_params() == 76147


def test_without_gates_every_task_gets_the_same_embedding_of_the_pooled_feature():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate="none", correlation=False))
    images, _ = toy_data(4, seed=2)
    embeddings = to_numpy(model({"image": images}, training=False))["_embeddings"]
    assert embeddings.shape == (4, 3, 16)
    for k in range(1, 3):
        np.testing.assert_array_equal(embeddings[:, k], embeddings[:, 0])
    # e = relu(bn(P f)), projected once from the pooled backbone feature.
    pooled = keras.Model(model.inputs, model.get_layer("pool").output)({"image": images}, training=False)
    shared = model.get_layer("projection_bn")(model.get_layer("shared_projection")(pooled), training=False)
    np.testing.assert_allclose(embeddings[:, 0], np.maximum(to_numpy(shared), 0.0), rtol=1e-5, atol=1e-6)


def test_mixture_of_experts_routes_the_pooled_feature_without_gate_or_projection():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate="mixture_of_experts", num_experts=3))
    names = {layer.name for layer in model.layers}
    assert "expert_routing" in names and not names & {"task_gate", "shared_projection", "projection_bn"}
    routing = model.get_layer("expert_routing")
    assert routing.experts.kernel.shape == (64, 3 * 16)  # C x E*D: the experts read the pooled feature once
    assert routing.router.kernel.shape == (64, 3 * 3)  # C x K*E
    images, _ = toy_data(4, seed=5)
    pooled = keras.Model(model.inputs, model.get_layer("pool").output)({"image": images}, training=False)
    embeddings = to_numpy(model({"image": images}, training=False))["_embeddings"]
    np.testing.assert_allclose(embeddings, to_numpy(routing(pooled, training=False)), rtol=1e-5, atol=1e-6)
    assert embeddings.min() >= 0.0  # a mixture of ReLU experts, as the gated embeddings are ReLUs


@pytest.mark.parametrize("gate", ["static", "input_conditioned"])
def test_gate_bottleneck_gates_a_shared_narrow_feature_and_round_trips(gate, tmp_path):
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate=gate, gate_bottleneck=8))
    assert model.get_layer("task_gate").task_offsets.shape == (3, 8)  # K x N, not K x 64 backbone channels
    assert model.get_layer("shared_projection").kernel.shape == (8, 16)
    plain = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate=gate))
    assert model.count_params() < plain.count_params()
    images, _ = toy_data(3, seed=4)
    # The gates see relu(bn(Q f)) of the pooled feature f.
    pooled = keras.Model(model.inputs, model.get_layer("pool").output)({"image": images}, training=False)
    narrow = model.get_layer("gate_bottleneck_bn")(model.get_layer("gate_bottleneck")(pooled), training=False)
    gated = model.get_layer("task_gate")(np.maximum(to_numpy(narrow), 0.0))
    expected = model.get_layer("projection_bn")(model.get_layer("shared_projection")(gated), training=False)
    embeddings = to_numpy(model({"image": images}, training=False))["_embeddings"]
    np.testing.assert_allclose(embeddings, np.maximum(to_numpy(expected), 0.0), rtol=1e-5, atol=1e-6)
    for weight in model.get_layer("gate_bottleneck").weights:
        weight.assign(to_numpy(weight) + 0.1)
    reloaded = run_model_saving_test(model, {"image": images}, tmp_path, extra_weights=("center_loss.centers",))
    assert reloaded.model_config.gate_bottleneck == 8


def test_gate_bottleneck_must_not_be_negative():
    from tfface.config import ConfigError

    with pytest.raises(ConfigError, match="model.gate_bottleneck must be >= 0"):
        tiny_config(gate_bottleneck=-1).validate()
    with pytest.raises(ConfigError, match="model.gate_bottleneck must be an integer"):
        tiny_config(gate_bottleneck=8.5).validate()


def test_num_experts_must_be_at_least_two():
    from tfface.config import ConfigError

    with pytest.raises(ConfigError, match="model.num_experts must be >= 2"):
        tiny_config(gate="mixture_of_experts", num_experts=1).validate()


@pytest.mark.parametrize("gate", ["static", "mixture_of_experts"])
def test_fit_learns_with_missing_labels_and_metrics_survive_reload(gate, tmp_path):
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate=gate))
    model.compile(learning_rate=1e-2)
    # Built up front, the optimizer does not make `fit` trace its step twice.
    model.optimizer.build(model.trainable_variables)
    images, labels = toy_data(192, seed=0)
    dataset = tf.data.Dataset.from_tensor_slices(({"image": images}, labels)).batch(32)
    history = model.fit(dataset, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert history["loss"][1] < history["loss"][0], history["loss"]
    # Chance is 0.5 on `left_bright` (the only labelled binary task).
    assert history["mean_accuracy"][1] > 0.75, history["mean_accuracy"]
    assert history["mean_balanced_accuracy"][1] > 0.75
    assert {"age_group_accuracy", "age_group_one_off"} <= set(history)

    # The metric lives in the model: a reloaded model evaluates identically.
    val_images, val_labels = toy_data(64, seed=1)
    path = str(tmp_path / "fitted.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    original = model.evaluate({"image": val_images}, val_labels, verbose=0, return_dict=True)
    restored = reloaded.evaluate({"image": val_images}, val_labels, verbose=0, return_dict=True)
    assert sorted(restored) == sorted(original)
    for key in original:
        assert restored[key] == pytest.approx(original[key], rel=1e-5, abs=1e-6), key
    public = reloaded.predict_tasks(val_images[:4])
    assert sorted(public) == sorted(SCHEMA.task_names)
    assert public["age_group"].shape == (4, 3)


def test_unlabelled_task_gets_no_gradient_in_its_head():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate="input_conditioned"))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
    model.optimizer.build(model.trainable_variables)
    images, labels = toy_data(16, seed=2)
    heads = model.get_layer("task_heads")
    kernel, bias = to_numpy(heads.kernel), to_numpy(heads.bias)
    model.train_on_batch({"image": images}, labels)
    new_kernel, new_bias = to_numpy(heads.kernel), to_numpy(heads.bias)
    never = SCHEMA.task_names.index("never_labelled")
    np.testing.assert_array_equal(new_kernel[never], kernel[never])
    np.testing.assert_array_equal(new_bias[never], bias[never])
    # The labelled tasks' heads did move, so the check above could fail.
    assert not np.allclose(new_kernel[0, :, 0], kernel[0, :, 0])
    assert not np.allclose(new_kernel[2], kernel[2])


def test_compile_refuses_a_loss_and_a_schema_is_required():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    with pytest.raises(ValueError, match="do not pass `loss`"):
        model.compile(loss="mse")
    with pytest.raises(ValueError, match="needs a schema"):
        GatedMultiTaskModel(config=tiny_config())


def test_compile_refuses_what_the_model_would_ignore():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    with pytest.raises(ValueError, match="do not pass `metrics`"):
        model.compile(metrics=["accuracy"])
    with pytest.raises(ValueError, match="ModelConfig.loss_weights"):
        model.compile(loss_weights={"left_bright": 2.0})
    with pytest.raises(ValueError, match="give them to your optimizer"):
        model.compile(optimizer="sgd", learning_rate=0.5)
    # A refused compile leaves a model that still compiles and trains.
    model.compile(learning_rate=1e-3)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(1e-3)
    images, labels = toy_data(8, seed=4)
    assert np.isfinite(model.train_on_batch({"image": images}, labels, return_dict=True)["loss"])


def test_compile_takes_keras_arguments_in_their_places_and_keeps_them_on_reload(tmp_path):
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    # Keras's positional order: the loss is refused as a loss.
    with pytest.raises(ValueError, match="do not pass `loss`"):
        model.compile(keras.optimizers.Adam(), "binary_crossentropy")
    model.compile(optimizer=None)  # evaluate and predict only
    images, labels = toy_data(8, seed=6)
    assert np.isfinite(model.evaluate({"image": images}, labels, verbose=0, return_dict=True)["loss"])
    model.compile(steps_per_execution=4, jit_compile=False)
    model.save(tmp_path / "m.keras")
    reloaded = tfface.models.load_model(tmp_path / "m.keras")
    assert reloaded.steps_per_execution == 4 and reloaded.jit_compile is False


def test_a_bare_image_batch_is_taken_without_a_warning_per_call():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    model.compile()
    images, labels = toy_data(8, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warned that the structure differs from {"image": ...}
        model.fit(images, labels, validation_data=(images, labels), epochs=1, verbose=0)
        loss = model.evaluate(images, labels, verbose=0, return_dict=True)["loss"]
        outputs = model.predict(images, verbose=0)
    assert np.isfinite(loss) and outputs["age_group"].shape == (8, 3)


def test_frozen_layers_stay_frozen_with_their_state_and_optimizer_after_reload(tmp_path):
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(center_loss_weight=0.1))
    model.center_loss.trainable = False
    model.get_layer("correlation").trainable = False
    model.compile()
    images, labels = toy_data(16, seed=7)
    moving_mean = to_numpy(model.get_layer("correlation").moving_mean)
    model.fit({"image": images}, labels, epochs=1, verbose=0)
    # Frozen, the correlation layer keeps its running mean (as BatchNormalization does).
    np.testing.assert_array_equal(to_numpy(model.get_layer("correlation").moving_mean), moving_mean)
    model.save(tmp_path / "frozen.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not in this model" warning, no skipped optimizer state
        reloaded = tfface.models.load_model(tmp_path / "frozen.keras")
    assert not reloaded.center_loss.trainable and not reloaded.get_layer("correlation").trainable
    assert len(reloaded.optimizer.variables) == len(model.optimizer.variables)
    for saved, loaded in zip(model.optimizer.variables, reloaded.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(saved), to_numpy(loaded))
    # Without the center loss the centers are frozen by construction: that reloads quietly too.
    plain = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(center_loss_weight=0.0))
    plain.save(tmp_path / "plain.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tfface.models.load_model(tmp_path / "plain.keras")


def test_a_model_frozen_whole_reloads_frozen_and_unfreezes(tmp_path):
    # Reloaded with only its layers frozen, the model read as trainable, so
    # `trainable = True` changed nothing (Keras skips a value it already has).
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    model.trainable = False
    model.save(tmp_path / "frozen.keras")
    reloaded = tfface.models.load_model(tmp_path / "frozen.keras")
    assert not reloaded.trainable and reloaded.trainable_weights == []
    reloaded.trainable = True
    fresh = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    assert len(reloaded.trainable_weights) == len(fresh.trainable_weights) > 0


def test_the_legacy_h5_format_is_refused_on_save_and_named_on_load(tmp_path):
    # Keras saved it with a warning, and no tfface loader read it back.
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    with pytest.raises(ValueError, match=r"tfface models save as \.keras"):
        model.save(tmp_path / "model.h5")
    assert not (tmp_path / "model.h5").exists()
    keras.Model.save(model, tmp_path / "earlier.h5")  # as a tfface before 0.2.8 let it be written
    with pytest.raises(ValueError, match="legacy HDF5 format") as refused:
        tfface.models.load_model(tmp_path / "earlier.h5")
    # The recovery the message gives works.
    assert "custom_objects={'GatedMultiTaskModel'" in str(refused.value)
    recovered = keras.models.load_model(tmp_path / "earlier.h5", custom_objects={"GatedMultiTaskModel": GatedMultiTaskModel})
    images = toy_data(2, seed=0)[0]
    np.testing.assert_allclose(recovered.predict_tasks(images)["age_group"], model.predict_tasks(images)["age_group"], atol=1e-6)


def test_fit_names_label_mistakes():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    model.compile()
    images, labels = toy_data(8, seed=5)
    with pytest.raises(ValueError, match=r"not tasks of this model's schema: \['left_brigth'\]"):
        model.fit({"image": images}, {"left_brigth": labels["left_bright"]}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="labels must be a dict"):
        model.fit({"image": images}, [labels["left_bright"]], epochs=1, verbose=0)
    with pytest.raises(ValueError, match="training needs labels"):
        model.fit({"image": images}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="do not take sample_weight"):
        model.fit({"image": images}, labels, sample_weight=np.ones(8), epochs=1, verbose=0)
    out_of_range = dict(labels, age_group=np.full(8, 7, "int32"))  # 3 classes
    # Arrays are checked on the host (the step's check is TensorFlow's only) ...
    with pytest.raises(ValueError, match=r"labels\['age_group'\] holds 7, out of range: -1 for missing, else 0..2 \(3 classes\); 8 such"):
        model.fit({"image": images}, out_of_range, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"labels\['left_bright'\] holds 2, out of range: -1 for missing, else 0..1 \(binary\)"):
        model.evaluate({"image": images}, dict(labels, left_bright=np.full(8, 2.0, "float32")), verbose=0)
    with pytest.raises(ValueError, match=r"labels\['age_group'\] holds 1.5: class ids are whole numbers"):
        model.fit({"image": images}, dict(labels, age_group=np.full(8, 1.5)), epochs=1, verbose=0)
    steps = int(model.optimizer.iterations)
    with pytest.raises(ValueError, match="validation_data has a third item"):
        model.fit({"image": images}, labels, validation_data=({"image": images}, labels, np.ones(8)), epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"labels\['age_group'\] holds 7"):
        model.fit({"image": images}, labels, validation_data=({"image": images}, out_of_range), epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == steps  # refused before an epoch of training, not after it
    # ... a dataset's in the step.
    dataset = tf.data.Dataset.from_tensor_slices(({"image": images}, out_of_range)).batch(8)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels out of range.*\(left_bright, never_labelled, age_group\):\] \[0 0 1\]"):
        model.fit(dataset, epochs=1, verbose=0)


def test_celeba_minus_one_plus_one_labels_are_refused_not_read_as_missing():
    # Taken as is, every -1 of CelebA's file encoding was a missing label:
    # no negatives were left, and balanced accuracy read 1.0.
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    model.compile()
    images, labels = toy_data(16, seed=3)
    signs = dict(labels, left_bright=np.tile([-1.0, 1.0], 8))
    with pytest.raises(ValueError, match=r"labels\['left_bright'\] are -1 and 1 with no 0.*\(labels \+ 1\) // 2"):
        model.fit({"image": images}, signs, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="are -1 and 1 with no 0"):
        model.evaluate({"image": images}, signs, verbose=0)
    # A few labels of one batch may miss the 0s by chance: accepted.
    few = {k: v[:4] for k, v in dict(labels, left_bright=np.array([-1.0, 1.0, 1.0, -1.0] * 4)).items()}
    model.evaluate({"image": images[:4]}, few, verbose=0)


def test_wrong_image_shapes_are_named_even_after_retracing():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    images, _ = toy_data(5, seed=6)
    one = model.predict_tasks(images[0])  # a single image is a batch of one
    assert one["left_bright"].shape == (1,) and one["age_group"].shape == (1, 3)
    empty = model.predict_tasks(images[:0])
    assert empty["left_bright"].shape == (0,) and empty["age_group"].shape == (0, 3)
    for bad in (np.zeros((2, 64, 64, 3)), np.zeros((2, 32, 32, 1))):
        with pytest.raises(ValueError, match=r"must have shape \(B, 32, 32, 3\)"):
            model.predict_tasks(bad)
    with pytest.raises(ValueError, match=r"must have shape \(B, 32, 32, 3\)"):
        model.predict({"image": np.zeros((2, 64, 64, 3), np.float32)}, verbose=0)  # checked on the host
    # Several batch sizes make Keras retrace with a relaxed input shape; the
    # graph must still refuse a wrong image size instead of giving probabilities.
    for n in (2, 3, 4, 5):
        model.predict_on_batch({"image": images[:n]})
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"must have shape \(B, 32, 32, 3\)"):
        model.predict_on_batch({"image": np.zeros((2, 64, 64, 3), np.float32)})


def test_constructor_checks_what_from_preset_checks():
    from tfface.config import ConfigError

    model = GatedMultiTaskModel(schema="synthetic", config=tiny_config())
    assert "Smiling" in model.schema.task_names
    with pytest.raises(ConfigError, match="builds 'gated' models"):
        GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(type="mask_guided"))
    with pytest.raises(ConfigError, match=r"unknown keys \['left_brigth'\]"):
        GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(loss_weights={"left_brigth": 2.0}))
    for key in ("gate_init", "center_loss_weight", "dropout"):
        with pytest.raises(ConfigError, match=f"model.{key} must be a finite number"):
            GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(**{key: float("nan")}))


@pytest.mark.slow
def test_reload_does_not_need_the_backbone_weights_file(tmp_path):
    size = 32
    app = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(size, size, 3))
    weights = tmp_path / "mnv3.weights.h5"
    app.save_weights(str(weights))
    config = tiny_config(backbone="mobilenet_v3_small", backbone_weights=str(weights))
    model = GatedMultiTaskModel(schema=SCHEMA, config=config)
    path = tmp_path / "model.keras"
    model.save(str(path))
    weights.unlink()  # the file a user trained from is gone (another machine, Colab restart)
    reloaded = keras.saving.load_model(str(path))
    images, _ = toy_data(2, seed=7)
    assert_allclose_tree(reloaded.predict_tasks(images), model.predict_tasks(images), atol=1e-6)


def test_config_dict_is_accepted_and_checked():
    model = GatedMultiTaskModel(schema=SCHEMA.to_dict(), config=dataclasses.asdict(tiny_config()))
    assert model.schema == SCHEMA and model.model_config.embedding_dim == 16
    from tfface.config import ConfigError

    with pytest.raises(ConfigError, match="model.gate"):
        GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate="sometimes"))
    with pytest.raises(ConfigError, match="bogus"):
        GatedMultiTaskModel(schema=SCHEMA, config={"bogus": 1})


def test_logits_match_public_outputs():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(gate="static"))
    images, _ = toy_data(2, seed=3)
    out = to_numpy(model({"image": images}, training=False))
    logits = out["_logits"]
    assert_allclose_tree(out["left_bright"], 1.0 / (1.0 + np.exp(-logits[:, 0])), atol=1e-6)
    assert_allclose_tree(out["never_labelled"], 1.0 / (1.0 + np.exp(-logits[:, 1])), atol=1e-6)
    e = np.exp(logits[:, 2:5] - logits[:, 2:5].max(axis=1, keepdims=True))
    assert_allclose_tree(out["age_group"], e / e.sum(axis=1, keepdims=True), atol=1e-6)


def test_correlation_starts_from_training_label_phi(tmp_path):
    from tfface.data.sources import open_source
    from tfface.models.multitask_model import logit_blocks
    from tfface.schema import get_schema
    from tfface.training.trainer import training_labels

    schema = get_schema("synthetic")
    source = open_source("synthetic:300", image_size=32, seed=0)
    labels = training_labels(schema, [source])
    model = GatedMultiTaskModel(
        schema=schema, config=tiny_config(correlation_init="label_correlation"), train_labels=labels
    )
    c = to_numpy(model.get_layer("correlation").correlation)
    starts = {t.name: start for t, (start, _) in zip(schema, logit_blocks(schema))}
    names = [t.name for t in schema.binary_tasks]
    pairs = [(a, b) for a in names for b in names if a != b]
    a, b = max(pairs, key=lambda p: abs(np.corrcoef(labels[p[0]], labels[p[1]])[0, 1]))
    phi = np.corrcoef(labels[a], labels[b])[0, 1]
    assert abs(phi) > 0.05  # the synthetic attributes are correlated
    np.testing.assert_allclose(c[starts[a], starts[b]], 0.1 * phi, rtol=1e-4)
    np.testing.assert_allclose(c[starts[a], starts[a]], 0.0)
    with pytest.raises(ValueError, match="no correlation layer"):
        GatedMultiTaskModel(schema=schema, config=tiny_config(correlation=False)).init_correlation_from_labels(labels)
    # Without the labels the start cannot be what the config says.
    from tfface.config import ConfigError

    with pytest.raises(ConfigError, match="needs the training labels.*train_labels="):
        GatedMultiTaskModel(schema=schema, config=tiny_config(correlation_init="label_correlation"))
    # A saved model reloads without them, with the learned start.
    path = tmp_path / "phi.keras"
    model.save(path)
    np.testing.assert_allclose(to_numpy(keras.saving.load_model(path).get_layer("correlation").correlation), c)


def test_a_model_keeps_its_own_copy_of_the_config(tmp_path):
    # A notebook user edits one config object between models.
    config = tiny_config(gate="static")
    model = GatedMultiTaskModel(schema=SCHEMA, config=config)
    config.gate = "none"
    config.image_size = 64
    other = GatedMultiTaskModel(schema=SCHEMA, config=config)
    assert model.model_config.gate == "static" and model.model_config.image_size == 32
    assert other.model_config.gate == "none"
    path = tmp_path / "first.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    images, _ = toy_data(3, seed=8)
    assert reloaded.image_size == 32
    assert_allclose_tree(reloaded.predict_tasks(images), model.predict_tasks(images), atol=1e-6)
    with pytest.raises(TypeError, match="ModelConfig or a dict.*from_preset"):
        GatedMultiTaskModel(schema=SCHEMA, config="gated_small_cnn_64")
    from tfface.schema import SchemaError

    with pytest.raises(SchemaError, match="a schema is a preset name"):
        GatedMultiTaskModel(schema=3, config=tiny_config())


def test_images_scaled_to_unit_range_get_a_warning():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    model.compile()
    images, labels = toy_data(4, seed=9)
    with pytest.warns(UserWarning, match="take pixel values 0..255"):
        model.predict_tasks(images / 255.0)
    with pytest.warns(UserWarning, match="take pixel values 0..255") as caught:
        model.predict({"image": images / 255.0}, verbose=0)
    with pytest.warns(UserWarning, match="take pixel values 0..255") as caught_in_fit:
        model.fit({"image": images / 255.0}, labels, epochs=1, verbose=0)
    # Each names the caller's line, not tfface's.
    assert {w.filename for w in [*caught, *caught_in_fit] if "0..255" in str(w.message)} == {__file__}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0..255 images, float or uint8, pass silently
        model.predict_tasks(images)
        model.predict_tasks(images.astype("uint8"))


def test_datasets_of_bare_images_are_taken_without_keras_structure_warnings():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    model.compile()
    images, labels = toy_data(8, seed=4)
    labelled = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    bare = tf.data.Dataset.from_tensor_slices(images).batch(4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*structure of `inputs`")
        model.fit(labelled, validation_data=labelled, epochs=1, verbose=0)
        model.evaluate(labelled, verbose=0)
        predicted = model.predict(bare, verbose=0)
    np.testing.assert_allclose(predicted["age_group"], model.predict_tasks(images)["age_group"], atol=1e-6)


def test_fit_and_evaluate_name_more_label_mistakes():
    model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config())
    model.compile()
    images, labels = toy_data(8, seed=10)
    # A multiclass id out of range is named, in fit too (it used to fail
    # first in a gather with "indices[..] = 7 is not in [0, 3)").
    bad = dict(labels, age_group=np.where(labels["age_group"] < 0, 0, 7).astype("int32"))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels out of range"):
        model.fit(tf.data.Dataset.from_tensor_slices(({"image": images}, bad)).batch(4), epochs=1, verbose=0)
    with pytest.raises(ValueError, match="evaluation needs labels"):
        model.evaluate({"image": images}, verbose=0)
    one_hot = dict(labels, age_group=np.eye(3, dtype="float32")[np.maximum(labels["age_group"], 0)])
    with pytest.raises(ValueError, match=r"labels\['age_group'\] must be class ids of shape \(B,\).*one-hot"):
        model.fit({"image": images}, one_hot, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="do not take class_weight"):
        model.fit({"image": images}, labels, class_weight={0: 1.0}, epochs=1, verbose=0)
    # Still trains afterwards.
    history = model.fit({"image": images}, labels, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # One-hot labels are named on the host as well, from arrays and from a
    # dataset: a step Keras retraced with relaxed shapes may see labels of
    # unknown rank, which the trace-time check skips (it failed on them
    # with "Cannot iterate over a shape with unknown rank").
    model._check_label_shapes({"age_group": tf.TensorSpec(None)})
    with pytest.raises(ValueError, match=r"labels\['age_group'\] must be class ids of shape \(B,\).*one-hot"):
        model.fit({"image": images}, one_hot, epochs=1, verbose=0)
    dataset = tf.data.Dataset.from_tensor_slices(({"image": images}, one_hot)).batch(4)
    with pytest.raises(ValueError, match=r"labels\['age_group'\] must be class ids of shape \(B,\).*one-hot"):
        model.fit(dataset, epochs=1, verbose=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "shuffle=True ... will be ignored" for a dataset
        model.fit(tf.data.Dataset.from_tensor_slices(({"image": images}, labels)).batch(4), epochs=1, verbose=0)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_b0"])
def test_applications_backbones_take_multiples_of_32_and_read_their_last_map(backbone):
    from tfface.config import ConfigError
    from tfface.models.backbones import build_backbone

    with pytest.raises(ConfigError, match=f"multiple of 32 for the {backbone} backbone"):
        tiny_config(backbone=backbone, image_size=48).validate()
    config = tiny_config(backbone=backbone, image_size=32)
    backbone_model = build_backbone(config)
    # P5 is the network's own output, not a 1x1 squeeze-and-excite tensor.
    app = {"mobilenet_v3_small": keras.applications.MobileNetV3Small,
           "efficientnet_b0": keras.applications.EfficientNetB0}[backbone](
        include_top=False, weights=None, input_shape=(32, 32, 3))
    assert backbone_model.output["P5"].shape[-1] == app.output.shape[-1]
    assert tuple(backbone_model.output["P3"].shape[1:3]) == (4, 4)


def test_mixed_precision_trains_with_correlation_and_center_loss(tmp_path):
    # What train.mixed_precision: on (and auto on a GPU) sets: the correlation
    # layer's running mean and the center loss must stay float32.
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        images, labels = toy_data(32, seed=3)
        model = GatedMultiTaskModel(schema=SCHEMA, config=tiny_config(center_loss_weight=0.01, correlation=True))
        model.compile()
        history = model.fit({"image": images}, labels, batch_size=16, epochs=1, verbose=0).history
        assert np.isfinite(history["loss"]).all()
        assert model.get_layer("correlation").moving_mean.dtype == "float32"
        assert model.center_loss.centers.dtype == "float32"
        model.save(tmp_path / "mixed.keras")
        expected = model.predict_tasks(images[:2])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    reloaded = keras.saving.load_model(tmp_path / "mixed.keras")
    assert reloaded.center_loss.centers.dtype == "float32"
    np.testing.assert_array_equal(reloaded.center_loss.centers.numpy(), model.center_loss.centers.numpy())
    outputs = reloaded.predict_tasks(images[:2])
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in outputs.values())
    for name, value in outputs.items():  # float16 compute before the save, float32 after: float16's precision
        np.testing.assert_allclose(value, expected[name], atol=5e-3, err_msg=name)
