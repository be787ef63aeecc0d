"""Custom layers: shapes, weight counts, serialization and their maths."""

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from harness import run_layer_test
from harness import to_numpy
from tfface.layers import CenterLoss, CorrelationRefinement, ExpertRouting, TaskGate, TaskGroupSelector, TaskHeads
from tfface.models.backbones import CaffePreprocessing


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


RNG = np.random.default_rng(0)
FEATURES = RNG.normal(size=(4, 5)).astype("float32")  # (B, C)
EMBEDDINGS = RNG.normal(size=(4, 3, 6)).astype("float32")  # (B, K, D)
LOGITS = RNG.normal(size=(4, 5)).astype("float32")  # output_sizes [1, 3, 1]


# --- TaskGate -------------------------------------------------------------


@pytest.mark.parametrize(
    "gate_type, num_params",
    [
        ("none", 0),
        ("static", 3 * 5),  # K * C offsets
        ("input_conditioned", 3 * 5 + (5 * 4 + 4) + 4 * 5),  # offsets + W1, b1 + W2
    ],
)
def test_task_gate_layer(gate_type, num_params, tmp_path):
    run_layer_test(
        TaskGate,
        dict(num_tasks=3, gate_type=gate_type, gate_init=1.5, hidden_units=4),
        FEATURES,
        expected_output_shape=(4, 3, 5),
        num_trainable_params=num_params,
        num_non_trainable_params=0,
        tmp_path=tmp_path,
    )


def test_task_gate_none_passes_features_through():
    out = to_numpy(TaskGate(3, gate_type="none")(FEATURES))
    for k in range(3):
        np.testing.assert_array_equal(out[:, k], FEATURES)


@pytest.mark.parametrize("gate_type", ["static", "input_conditioned"])
def test_task_gates_start_at_sigmoid_of_gate_init(gate_type):
    gate = TaskGate(3, gate_type=gate_type, gate_init=2.0, hidden_units=4)
    gate.build(FEATURES.shape)
    gates = to_numpy(gate.gates(ops.convert_to_tensor(FEATURES)))
    np.testing.assert_allclose(gates, np.full((4, 3, 5), sigmoid(2.0)), rtol=1e-6)
    np.testing.assert_allclose(to_numpy(gate(FEATURES)), np.broadcast_to(sigmoid(2.0) * FEATURES[:, None], (4, 3, 5)), rtol=1e-5)


def test_static_gate_is_per_task_and_input_independent():
    gate = TaskGate(2, gate_type="static")
    gate.build((None, 5))
    offsets = RNG.normal(size=(2, 5)).astype("float32")
    gate.task_offsets.assign(offsets)
    gates = to_numpy(gate.gates(ops.convert_to_tensor(FEATURES)))
    np.testing.assert_allclose(gates, np.broadcast_to(sigmoid(offsets), (4, 2, 5)), rtol=1e-5)


def test_input_conditioned_gate_depends_on_input():
    gate = TaskGate(2, gate_type="input_conditioned", gate_init=0.5, hidden_units=4)
    gate.build((None, 5))
    # W2 starts at zero (gates start input-independent); give it values.
    w2 = RNG.normal(size=(4, 5)).astype("float32")
    gate.excite.kernel.assign(w2)
    gates = to_numpy(gate.gates(ops.convert_to_tensor(FEATURES)))
    assert not np.allclose(gates[0], gates[1]), "two inputs gave the same gates"
    # SE formula: sigmoid(W2 relu(W1 f + b1) + a_k), a shared term for all tasks.
    w1, b1 = to_numpy(gate.squeeze.kernel), to_numpy(gate.squeeze.bias)
    shared = np.maximum(FEATURES @ w1 + b1, 0.0) @ w2
    expected = sigmoid(shared[:, None, :] + to_numpy(gate.task_offsets)[None])
    np.testing.assert_allclose(gates, expected, rtol=1e-5, atol=1e-6)


def test_task_gate_rejects_unknown_type():
    with pytest.raises(ValueError, match="gate_type.*'squeeze'"):
        TaskGate(2, gate_type="squeeze")


# --- ExpertRouting ----------------------------------------------------------


def test_expert_routing_layer(tmp_path):
    run_layer_test(
        ExpertRouting,
        dict(num_tasks=3, num_experts=2, units=6),
        FEATURES,
        expected_output_shape=(4, 3, 6),
        # experts C*E*D + E*D, their BN gamma and beta, router C*K*E + K*E
        num_trainable_params=(5 * 12 + 12) + 2 * 12 + (5 * 6 + 6),
        num_non_trainable_params=2 * 12,  # BN moving mean and variance
        call_kwargs=dict(training=False),
        tmp_path=tmp_path,
    )


def _routing_with_random_weights(seed=1):
    routing = ExpertRouting(3, num_experts=2, units=6)
    routing.build((None, 5))
    rng = np.random.default_rng(seed)
    for weight in routing.weights:
        value = rng.normal(size=weight.shape).astype("float32")
        weight.assign(np.abs(value) + 0.5 if "variance" in weight.path else value)
    return routing


def test_expert_routing_starts_as_an_even_mixture_for_every_task():
    routing = ExpertRouting(3, num_experts=4, units=6)
    out = to_numpy(routing(FEATURES, training=False))
    np.testing.assert_allclose(to_numpy(routing.routing_weights(FEATURES)), np.full((4, 3, 4), 0.25), rtol=1e-6)
    for k in range(1, 3):
        np.testing.assert_allclose(out[:, k], out[:, 0], rtol=1e-6)


def test_expert_routing_mixes_the_experts_per_task_and_input():
    routing = _routing_with_random_weights()
    weights = to_numpy(routing.routing_weights(FEATURES))
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(weights[:, 0], weights[:, 1]), "two tasks got the same mixture"
    assert not np.allclose(weights[0], weights[1]), "two inputs got the same mixture"
    # e_k = sum_e pi_ke relu(bn(W_e f)), pi_k = softmax(U_k f) (inference BN).
    w, b = to_numpy(routing.experts.kernel), to_numpy(routing.experts.bias)
    bn = routing.experts_bn
    gamma, beta = to_numpy(bn.gamma), to_numpy(bn.beta)
    mean, var = to_numpy(bn.moving_mean), to_numpy(bn.moving_variance)
    experts = np.maximum((FEATURES @ w + b - mean) / np.sqrt(var + bn.epsilon) * gamma + beta, 0.0)
    u, c = to_numpy(routing.router.kernel), to_numpy(routing.router.bias)
    pi = softmax((FEATURES @ u + c).reshape(4, 3, 2))
    expected = np.einsum("bke,bed->bkd", pi, experts.reshape(4, 2, 6))
    np.testing.assert_allclose(to_numpy(routing(FEATURES, training=False)), expected, rtol=1e-4, atol=1e-5)


def test_expert_routing_passes_gradients_to_its_input_and_router():
    routing = _routing_with_random_weights()
    features = tf.Variable(FEATURES)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(routing(features, training=True)[:, 1] ** 2)
    feature_grad, router_grad = tape.gradient(loss, [features, routing.router.kernel])
    assert np.abs(feature_grad.numpy()).sum() > 0
    assert np.abs(router_grad.numpy()).sum() > 0


def test_expert_routing_refuses_a_single_expert():
    with pytest.raises(ValueError, match="at least 2 experts"):
        ExpertRouting(3, num_experts=1)


# --- TaskHeads ------------------------------------------------------------


# --- TaskGroupSelector (MGMTN heads) and ResNet50's input layer -------------


def test_task_group_selector_hands_each_task_its_groups_row(tmp_path):
    group_features = RNG.normal(size=(4, 3, 6)).astype("float32")  # (B, G, D)
    output = run_layer_test(
        TaskGroupSelector,
        dict(task_groups=[2, 0, 2, 1]),
        group_features,
        expected_output_shape=(4, 4, 6),
        num_trainable_params=0,
        num_non_trainable_params=0,
        tmp_path=tmp_path,
    )
    np.testing.assert_array_equal(to_numpy(output), group_features[:, [2, 0, 2, 1]])
    with pytest.raises(ValueError, match="index past the 3 groups"):
        TaskGroupSelector([0, 3])(group_features)


def test_caffe_preprocessing_is_resnets_preprocess_input(tmp_path):
    import keras

    images = RNG.uniform(0, 255, size=(2, 5, 5, 3)).astype("float32")
    output = run_layer_test(
        CaffePreprocessing, {}, images, expected_output_shape=(2, 5, 5, 3), num_trainable_params=0, tmp_path=tmp_path
    )
    expected = images[..., ::-1] - np.array([103.939, 116.779, 123.68], "float32")  # BGR, ImageNet means
    np.testing.assert_allclose(to_numpy(output), expected, atol=1e-4)
    np.testing.assert_allclose(to_numpy(output), to_numpy(keras.applications.resnet.preprocess_input(images)), atol=1e-4)


def test_task_heads_layer(tmp_path):
    run_layer_test(
        TaskHeads,
        dict(output_sizes=[1, 3, 1]),
        EMBEDDINGS,
        expected_output_shape=(4, 5),
        num_trainable_weights=2,
        # padded kernel K * D * max(sizes) + bias K * max(sizes)
        num_trainable_params=3 * 6 * 3 + 3 * 3,
        num_non_trainable_params=0,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("sizes", [[1, 3, 1], [3, 1, 1], [1, 1, 3], [1, 1, 1], [2, 3, 4]])
def test_task_heads_match_per_task_numpy(sizes):
    heads = TaskHeads(sizes)
    heads.build(EMBEDDINGS.shape)
    kernel = RNG.normal(size=(3, 6, max(sizes))).astype("float32")
    bias = RNG.normal(size=(3, max(sizes))).astype("float32")
    heads.kernel.assign(kernel)
    heads.bias.assign(bias)
    expected = np.concatenate(
        [EMBEDDINGS[:, k] @ kernel[k, :, :size] + bias[k, :size] for k, size in enumerate(sizes)],
        axis=1,
    )
    np.testing.assert_allclose(to_numpy(heads(EMBEDDINGS)), expected, rtol=1e-5, atol=1e-5)


def test_task_heads_rejects_wrong_task_count():
    with pytest.raises(ValueError, match="3 embeddings for 2 tasks"):
        TaskHeads([1, 1])(EMBEDDINGS)


# --- CorrelationRefinement --------------------------------------------------


def test_correlation_refinement_layer(tmp_path):
    run_layer_test(
        CorrelationRefinement,
        dict(output_sizes=[1, 3, 1], momentum=0.9),
        LOGITS,
        expected_output_shape=(4, 5),
        num_trainable_params=5 * 5,  # C
        num_non_trainable_params=5,  # moving mean
        call_kwargs=dict(training=False),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("training", [False, True])
def test_correlation_refinement_is_identity_at_init(training):
    layer = CorrelationRefinement([1, 3, 1])
    np.testing.assert_array_equal(to_numpy(layer(LOGITS, training=training)), LOGITS)


def refine_numpy(logits, correlation, moving_mean, sizes):
    starts = np.cumsum([0] + sizes)
    probs, mask = [], np.ones_like(correlation)
    for s, e in zip(starts[:-1], starts[1:]):
        probs.append(sigmoid(logits[:, s:e]) if e - s == 1 else softmax(logits[:, s:e]))
        mask[s:e, s:e] = 0.0
    probs = np.concatenate(probs, axis=1)
    return logits + (probs - moving_mean) @ (correlation * mask).T


def test_correlation_refinement_masks_each_tasks_own_block():
    layer = CorrelationRefinement([1, 3, 1])
    layer.build(LOGITS.shape)
    correlation = RNG.normal(size=(5, 5)).astype("float32")
    layer.correlation.assign(correlation)
    out = to_numpy(layer(LOGITS))
    np.testing.assert_allclose(out, refine_numpy(LOGITS, correlation, 0.5, [1, 3, 1]), rtol=1e-5, atol=1e-5)
    # Moving the multiclass block's logits moves that block only by itself ...
    shifted = LOGITS.copy()
    shifted[:, 1:4] += RNG.normal(size=(4, 3)).astype("float32")
    out_shifted = to_numpy(layer(shifted))
    np.testing.assert_allclose(out_shifted[:, 1:4] - shifted[:, 1:4], out[:, 1:4] - LOGITS[:, 1:4], atol=1e-5)
    # ... while the other tasks see it.
    assert not np.allclose(out_shifted[:, [0, 4]], out[:, [0, 4]])


def test_correlation_moving_mean_updates_only_in_training():
    layer = CorrelationRefinement([1, 3, 1], momentum=0.9)
    layer(LOGITS, training=False)
    np.testing.assert_array_equal(to_numpy(layer.moving_mean), np.full(5, 0.5, "float32"))
    layer(LOGITS, training=True)
    probs = np.concatenate(
        [sigmoid(LOGITS[:, :1]), softmax(LOGITS[:, 1:4]), sigmoid(LOGITS[:, 4:])], axis=1
    )
    expected = 0.9 * 0.5 + 0.1 * probs.mean(axis=0)
    np.testing.assert_allclose(to_numpy(layer.moving_mean), expected, rtol=1e-5)


def test_set_from_label_correlation_uses_phi_off_the_diagonal_blocks():
    sizes = [1, 3, 1, 1]
    rng = np.random.default_rng(3)
    n = 40
    a = rng.integers(0, 2, n).astype("float64")
    age = np.eye(3)[rng.integers(0, 3, n)]
    labels = np.column_stack([a, age, a, 1.0 - a])  # col 4 == col 0, col 5 == not col 0
    labels[:5, 0] = np.nan  # missing labels are skipped pairwise
    labels[5:8, 5] = np.nan
    layer = CorrelationRefinement(sizes)
    layer.build((None, 6))
    layer.set_from_label_correlation(labels, scale=0.2)
    c = to_numpy(layer.correlation)
    np.testing.assert_allclose([c[0, 4], c[4, 0]], [0.2, 0.2], rtol=1e-5)
    np.testing.assert_allclose([c[0, 5], c[5, 0], c[4, 5]], [-0.2, -0.2, -0.2], rtol=1e-5)
    np.testing.assert_array_equal(np.diag(c), np.zeros(6))
    np.testing.assert_array_equal(c[1:4, :], 0.0)  # multiclass blocks are not used
    np.testing.assert_array_equal(c[:, 1:4], 0.0)


def test_correlation_refinement_rejects_wrong_width():
    with pytest.raises(ValueError, match="expects 4 logits, got 5"):
        CorrelationRefinement([1, 3])(LOGITS)


# --- CenterLoss -------------------------------------------------------------

LABELS = np.array([[0, 2], [1, -1], [-1, 0], [1, 2]], "int32")  # (B, K=2)
EMB2 = RNG.normal(size=(4, 2, 3)).astype("float32")


def center_loss_numpy(embeddings, labels, centers, weight):
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for k in range(labels.shape[1]):
            if labels[b, k] < 0:
                continue
            total += np.sum((embeddings[b, k] - centers[k, labels[b, k]]) ** 2)
            count += 1
    return 0.5 * weight * total / max(count, 1)


def wen_update_numpy(embeddings, labels, centers, update_rate):
    """Wen et al. 2016, eq. 4: c_j -= alpha * sum_{y_i=j} (c_j - x_i) / (1 + n_j)."""
    updated = centers.copy()
    for k in range(labels.shape[1]):
        for j in range(centers.shape[1]):
            chosen = labels[:, k] == j
            step = np.sum(centers[k, j] - embeddings[chosen, k], axis=0) / (1 + chosen.sum())
            updated[k, j] = centers[k, j] - update_rate * step
    return updated


def test_center_loss_layer(tmp_path):
    value = run_layer_test(
        CenterLoss,
        dict(num_classes=[2, 3], weight=0.1, update_rate=0.5),
        [EMB2, LABELS],
        expected_output_shape=(),
        num_trainable_params=0,
        num_non_trainable_params=2 * 3 * 3,  # K * max(C) * D centers, updated by the layer
        tmp_path=tmp_path,
    )
    # Zero-initialised centers: the loss is the squared norm of labelled entries.
    np.testing.assert_allclose(value, center_loss_numpy(EMB2, LABELS, np.zeros((2, 3, 3)), 0.1), rtol=1e-5)


def test_center_loss_matches_numpy_with_masking():
    layer = CenterLoss([2, 3], weight=0.1, update_rate=0.5)
    layer.build(EMB2.shape)
    centers = RNG.normal(size=(2, 3, 3)).astype("float32")
    layer.centers.assign(centers)
    expected = center_loss_numpy(EMB2, LABELS, centers, 0.1)
    np.testing.assert_allclose(to_numpy(layer(EMB2, LABELS)), expected, rtol=1e-5)
    # Changing a masked (-1) embedding changes nothing.
    moved = EMB2.copy()
    moved[1, 1] += 10.0
    np.testing.assert_allclose(to_numpy(layer(moved, LABELS)), expected, rtol=1e-5)
    assert float(to_numpy(layer(EMB2, np.full_like(LABELS, -1)))) == 0.0


def test_center_loss_is_zero_at_the_centers():
    layer = CenterLoss([2, 3])
    layer.build(EMB2.shape)
    centers = RNG.normal(size=(2, 3, 3)).astype("float32")
    layer.centers.assign(centers)
    at_centers = centers[np.arange(2)[None], np.maximum(LABELS, 0)]  # (B, K, D)
    assert float(to_numpy(layer(at_centers, LABELS))) == pytest.approx(0.0, abs=1e-7)


def test_center_loss_moves_embeddings_only_through_its_gradient():
    layer = CenterLoss([2, 3], weight=0.1, update_rate=0.5)
    layer.build(EMB2.shape)
    centers = RNG.normal(size=(2, 3, 3)).astype("float32")
    layer.centers.assign(centers)
    embeddings = tf.Variable(EMB2)
    with tf.GradientTape() as tape:
        loss = layer(embeddings, LABELS)
    grad_centers, grad_embeddings = tape.gradient(loss, [layer.centers, embeddings])
    assert grad_centers is None and not layer.trainable_weights  # no optimizer moves the centers
    count = np.sum(LABELS >= 0)
    pulled = centers[np.arange(2)[None], np.maximum(LABELS, 0)]
    expected = 0.1 * (EMB2 - pulled) * (LABELS >= 0)[..., None] / count
    np.testing.assert_allclose(grad_embeddings.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("update_rate", [0.5, 0.05])
def test_center_update_follows_wen_et_al_for_the_labelled_classes_only(update_rate):
    # Under the model's AdamW the step did not scale with update_rate, and
    # momentum moved centers whose class had left the batch.
    layer = CenterLoss([2, 3], weight=0.1, update_rate=update_rate)
    layer.build(EMB2.shape)
    centers = RNG.normal(size=(2, 3, 3)).astype("float32")
    layer.centers.assign(centers)
    layer(EMB2, LABELS)  # not training: no update
    np.testing.assert_array_equal(to_numpy(layer.centers), centers)
    layer(EMB2, LABELS, training=True)
    updated = to_numpy(layer.centers)
    np.testing.assert_allclose(updated, wen_update_numpy(EMB2, LABELS, centers, update_rate), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(updated[1, 1], centers[1, 1])  # class 1 of task 1 is not labelled
    assert not np.allclose(updated[0, 1], centers[0, 1])
    # The next batch labels nothing: nothing moves.
    layer(EMB2, np.full_like(LABELS, -1), training=True)
    np.testing.assert_array_equal(to_numpy(layer.centers), updated)
    layer.trainable = False  # frozen, as a frozen BatchNormalization keeps its statistics
    layer(EMB2, LABELS, training=True)
    np.testing.assert_array_equal(to_numpy(layer.centers), updated)


def test_center_loss_rejects_wrong_task_count():
    with pytest.raises(ValueError, match="2 embeddings for 3 tasks"):
        CenterLoss([2, 2, 2])(EMB2, LABELS)
