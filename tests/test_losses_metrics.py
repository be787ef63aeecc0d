"""Masked losses and `MultiTaskMetrics` against hand numpy computations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness import to_numpy
from tfface.losses import masked_bce_dice
from tfface.losses import masked_binary_crossentropy
from tfface.losses import masked_binary_crossentropy_columns
from tfface.losses import masked_sparse_categorical_crossentropy
from tfface.metrics import MultiTaskMetrics
from tfface.metrics import balanced_accuracy

RNG = np.random.default_rng(0)


def bce_numpy(labels, logits):
    keep = labels >= 0
    p = 1.0 / (1.0 + np.exp(-logits[keep]))
    y = labels[keep]
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))) if keep.any() else 0.0


def scce_numpy(labels, logits):
    keep = labels >= 0
    if not keep.any():
        return 0.0
    z = logits[keep] - logits[keep].max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_p[np.arange(keep.sum()), labels[keep]]))


# --- losses -----------------------------------------------------------------


def test_masked_bce_ignores_missing_labels_exactly():
    labels = np.array([1, 0, -1, 1, -1, 0], "float32")
    logits = RNG.normal(size=6).astype("float32") * 3
    value = float(to_numpy(masked_binary_crossentropy(labels, logits)))
    assert value == pytest.approx(bce_numpy(labels, logits), rel=1e-5)
    moved = logits.copy()
    moved[[2, 4]] = [50.0, -50.0]  # missing entries: any logit
    assert float(to_numpy(masked_binary_crossentropy(labels, moved))) == pytest.approx(value, rel=1e-6)
    # Extreme logits stay finite (stable form).
    big = float(to_numpy(masked_binary_crossentropy(np.array([1.0, 0.0]), np.array([-100.0, 100.0]))))
    assert big == pytest.approx(100.0, rel=1e-5)


def test_masked_bce_gradient_is_zero_for_missing_labels():
    labels = tf.constant([1, -1, 0, -1], tf.float32)
    logits = tf.Variable(RNG.normal(size=4).astype("float32"))
    with tf.GradientTape() as tape:
        loss = masked_binary_crossentropy(labels, logits)
    grad = tape.gradient(loss, logits).numpy()
    np.testing.assert_array_equal(grad[[1, 3]], 0.0)
    assert np.all(grad[[0, 2]] != 0.0)


def test_masked_bce_columns_are_each_tasks_own_masked_mean():
    labels = RNG.integers(-1, 2, (9, 4)).astype("float32")
    labels[:, 2] = -1  # a task this batch does not label: 0, not NaN
    logits = RNG.normal(size=(9, 4)).astype("float32") * 3
    columns = to_numpy(masked_binary_crossentropy_columns(labels, logits))
    assert columns.shape == (4,)
    expected = [bce_numpy(labels[:, k], logits[:, k]) for k in range(4)]
    np.testing.assert_allclose(columns, expected, rtol=1e-5)
    assert columns[2] == 0.0


def test_model_loss_is_the_weighted_sum_of_each_tasks_masked_loss():
    """Deep supervision (raw and refined logits), per-task and family
    weights, a task the labels leave out and a zero weight, against numpy."""
    from tfface.config import ModelConfig
    from tfface.models import GatedMultiTaskModel
    from tfface.schema import Schema, Task

    schema = Schema(
        [Task("a"), Task("b"), Task("c"), Task("d"), Task("age_group", kind="multiclass", classes=("x", "y", "z"))],
        name="toy",
    )
    weights = {"attributes": 1.5, "b": 0.0, "c": 2.0, "age_group": 0.5}
    config = ModelConfig(
        image_size=32, backbone_widths=(8, 16, 32, 64), embedding_dim=8, center_loss_weight=0.0, loss_weights=weights
    )
    model = GatedMultiTaskModel(schema=schema, config=config)
    rng = np.random.default_rng(3)
    y_pred = model({"image": rng.uniform(0, 255, (12, 32, 32, 3)).astype("float32")}, training=False)
    labels = {name: rng.integers(-1, 2, 12).astype("float32") for name in ("a", "b", "c")}  # no "d"
    labels["age_group"] = rng.integers(-1, 3, 12).astype("int32")
    loss = float(to_numpy(model.compute_loss(y=labels, y_pred=y_pred, training=False)))
    expected = 0.0
    for key in ("_logits", "_raw_logits"):
        z = to_numpy(y_pred[key]).astype("float64")
        expected += 1.5 * bce_numpy(labels["a"], z[:, 0]) + 2.0 * bce_numpy(labels["c"], z[:, 2])
        expected += 0.5 * scce_numpy(labels["age_group"], z[:, 4:7])
    assert loss == pytest.approx(expected, rel=1e-5)


def test_masked_scce_ignores_missing_labels_exactly():
    labels = np.array([2, -1, 0, 1, -1], "int32")
    logits = RNG.normal(size=(5, 3)).astype("float32") * 2
    value = float(to_numpy(masked_sparse_categorical_crossentropy(labels, logits)))
    assert value == pytest.approx(scce_numpy(labels, logits), rel=1e-5)
    moved = logits.copy()
    moved[[1, 4]] = 100.0
    assert float(to_numpy(masked_sparse_categorical_crossentropy(labels, moved))) == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize(
    "loss, logits",
    [
        (masked_binary_crossentropy, np.array([0.3, -2.0, 5.0], "float32")),
        (masked_sparse_categorical_crossentropy, np.ones((3, 4), "float32")),
    ],
)
def test_masked_losses_are_zero_without_labels(loss, logits):
    value = float(to_numpy(loss(np.full(3, -1), logits)))
    # +0.0: a batch of one source logs "0.0000e+00", not "-0.0000e+00".
    assert value == 0.0 and not np.signbit(value)


def bce_dice_numpy(true, pred, valid, smooth=1.0):
    pred = np.clip(pred, 1e-6, 1 - 1e-6)
    total = []
    for t, p in zip(true, pred):
        bce = np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)))
        inter = (t * p).sum(axis=(0, 1))
        union = t.sum(axis=(0, 1)) + p.sum(axis=(0, 1))
        dice = 1.0 - np.mean((2 * inter + smooth) / (union + smooth))
        total.append(bce + dice)
    total = np.array(total)
    return float((total * valid).sum() / max(valid.sum(), 1.0))


def test_masked_bce_dice_matches_numpy_and_skips_invalid():
    true = (RNG.uniform(size=(3, 4, 4, 2)) > 0.5).astype("float32")
    pred = RNG.uniform(size=(3, 4, 4, 2)).astype("float32")
    valid = np.array([1, 0, 1], "float32")
    value = float(to_numpy(masked_bce_dice(true, pred, valid)))
    assert value == pytest.approx(bce_dice_numpy(true, pred, valid), rel=1e-5)
    pred_bad = pred.copy()
    pred_bad[1] = 1.0 - true[1]  # wrong on the invalid example: no effect
    assert float(to_numpy(masked_bce_dice(true, pred_bad, valid))) == pytest.approx(value, rel=1e-6)
    assert float(to_numpy(masked_bce_dice(true, pred, np.zeros(3)))) == 0.0
    # A perfect prediction has (almost) zero loss.
    assert float(to_numpy(masked_bce_dice(true, true, valid))) < 1e-4


# --- MultiTaskMetrics -----------------------------------------------------------

SPECS = [
    ("smile", 2, 0.5),
    ("hat", 2, 0.3),  # own threshold
    ("nobody", 2, 0.5),  # never labelled: excluded from the means
    ("absent", 2, 0.5),  # not even in y_true: excluded
    ("age_group", 5, 0.5),
    ("race", 3, 0.5),
]


def make_batch(rng, n):
    y_true = {
        "smile": rng.choice([-1, 0, 1], n).astype("float32"),
        "hat": rng.choice([-1, 1], n).astype("float32"),  # positives only
        "nobody": np.full(n, -1, "float32"),
        "age_group": rng.integers(-1, 5, n).astype("int32"),
        "race": rng.integers(-1, 3, n).astype("int32"),
    }
    y_pred = {
        "smile": rng.uniform(size=n).astype("float32"),
        "hat": rng.uniform(size=n).astype("float32"),
        "nobody": rng.uniform(size=n).astype("float32"),
        "absent": rng.uniform(size=n).astype("float32"),
        "age_group": rng.dirichlet(np.ones(5), n).astype("float32"),
        "race": rng.dirichlet(np.ones(3), n).astype("float32"),
    }
    return y_true, y_pred


def metrics_numpy(batches):
    y_true = {k: np.concatenate([b[0][k] for b in batches]) for k in batches[0][0]}
    y_pred = {k: np.concatenate([b[1][k] for b in batches]) for k in batches[0][1]}
    accs, bals = [], []
    for name, threshold in (("smile", 0.5), ("hat", 0.3)):  # the labelled binary tasks
        keep = y_true[name] >= 0
        label, pred = y_true[name][keep] > 0.5, y_pred[name][keep] >= threshold
        accs.append(np.mean(label == pred))
        recalls = [np.mean(pred[label == v] == v) for v in (True, False) if np.any(label == v)]
        bals.append(np.mean(recalls))
    out = {"mean_accuracy": np.mean(accs), "mean_balanced_accuracy": np.mean(bals)}
    for name in ("age_group", "race"):
        keep = y_true[name] >= 0
        label, pred = y_true[name][keep], y_pred[name][keep].argmax(axis=1)
        out[f"{name}_accuracy"] = np.mean(label == pred)
        if name == "age_group":
            out["age_group_one_off"] = np.mean(np.abs(label - pred) <= 1)
    return out


def test_multitask_metrics_match_hand_computation():
    rng = np.random.default_rng(5)
    batches = [make_batch(rng, 16), make_batch(rng, 11)]
    metric = MultiTaskMetrics(SPECS)
    for y_true, y_pred in batches:
        metric.update_state(y_true, y_pred)
    result = to_numpy(metric.result())
    expected = metrics_numpy(batches)
    assert sorted(result) == sorted(expected)
    for key, value in expected.items():
        assert float(result[key]) == pytest.approx(value, rel=1e-6), key
    # The public numpy helper agrees on one task.
    smile_true = np.concatenate([b[0]["smile"] for b in batches])
    smile_pred = np.concatenate([b[1]["smile"] for b in batches])
    single = MultiTaskMetrics([("smile", 2, 0.5)])
    single.update_state({"smile": smile_true}, {"smile": smile_pred})
    assert float(to_numpy(single.result()["mean_balanced_accuracy"])) == pytest.approx(
        balanced_accuracy(smile_true, smile_pred), rel=1e-6
    )
    metric.reset_state()  # nothing counted: the binary means read 0, a multiclass task NaN (not scored)
    after_reset = {k: float(v) for k, v in to_numpy(metric.result()).items()}
    assert after_reset["mean_accuracy"] == after_reset["mean_balanced_accuracy"] == 0.0
    assert all(np.isnan(v) for k, v in after_reset.items() if not k.startswith("mean_"))
    assert len(after_reset) > 2


def test_multitask_metrics_perfect_predictions_and_one_off():
    metric = MultiTaskMetrics([("smile", 2, 0.5), ("age_group", 9, 0.5)])
    labels = np.array([0, 3, 8, -1])
    probs = np.eye(9, dtype="float32")[[0, 4, 6, 2]]  # exact, off by one, off by two, unlabelled
    metric.update_state(
        {"smile": np.array([1, 0, -1, 1], "float32"), "age_group": labels},
        {"smile": np.array([0.9, 0.1, 0.9, 0.6], "float32"), "age_group": probs},
    )
    result = {k: float(v) for k, v in to_numpy(metric.result()).items()}
    assert result["mean_accuracy"] == 1.0 and result["mean_balanced_accuracy"] == 1.0
    assert result["age_group_accuracy"] == pytest.approx(1 / 3)
    assert result["age_group_one_off"] == pytest.approx(2 / 3)


def test_multitask_metrics_score_a_two_class_multiclass_task_as_evaluate_does():
    # Training monitors what `evaluate` reports: by the schema's kind, not
    # by the class count (a two-class softmax task is not in the means).
    metric = MultiTaskMetrics([("smile", 2, 0.5, "binary"), ("pair", 2, 0.5, "multiclass")])
    probs = np.array([[0.2, 0.8], [0.7, 0.3], [0.6, 0.4]], "float32")  # (B, 2) softmax
    metric.update_state(
        {"smile": np.array([1, 0, 1], "float32"), "pair": np.array([0, 1, 1], "int32")},
        {"smile": np.array([0.9, 0.2, 0.7], "float32"), "pair": probs},
    )
    result = {k: float(v) for k, v in to_numpy(metric.result()).items()}
    assert result["mean_balanced_accuracy"] == 1.0  # smile alone
    assert result["pair_accuracy"] == pytest.approx(0.0)


def test_model_metrics_mean_over_the_same_tasks_as_evaluate():
    from tfface.config import ModelConfig
    from tfface.evaluation.evaluate import compute_metrics
    from tfface.models import GatedMultiTaskModel
    from tfface.schema import Schema, Task

    schema = Schema([Task("a"), Task("b", kind="multiclass", classes=("x", "y"))], name="two_class")
    model = GatedMultiTaskModel(
        schema=schema, config=ModelConfig(image_size=32, backbone_widths=(8, 16, 32, 64), embedding_dim=8)
    )
    assert model.attribute_metrics.binary == [("a", 0.5)]
    rng = np.random.default_rng(0)
    labels = {"a": rng.integers(0, 2, 12).astype("float32"), "b": rng.integers(0, 2, 12).astype("int32")}
    probs = {"a": rng.uniform(size=12).astype("float32"), "b": rng.dirichlet([1, 1], 12).astype("float32")}
    model.attribute_metrics.update_state(labels, probs)
    keras_result = {k: float(v) for k, v in to_numpy(model.attribute_metrics.result()).items()}
    evaluated = compute_metrics(schema, labels, probs)
    assert keras_result["mean_balanced_accuracy"] == pytest.approx(evaluated["mean_balanced_accuracy"], rel=1e-6)
    assert keras_result["b_accuracy"] == pytest.approx(evaluated["tasks"]["b"]["accuracy"], rel=1e-6)


def test_multitask_metrics_config_round_trip():
    metric = MultiTaskMetrics(SPECS, name="attrs")
    config = metric.get_config()
    clone = MultiTaskMetrics.from_config(config)
    assert clone.get_config() == config and clone.task_specs == metric.task_specs
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert isinstance(revived, MultiTaskMetrics) and revived.get_config() == config
    # State moves with the variables, and gives the same results.
    y_true, y_pred = make_batch(np.random.default_rng(1), 12)
    metric.update_state(y_true, y_pred)
    for source, target in zip(metric.variables, revived.variables):
        target.assign(source)
    for key, value in to_numpy(metric.result()).items():
        assert float(to_numpy(revived.result())[key]) == pytest.approx(float(value))


def test_multitask_metrics_refuse_sample_weight_rather_than_ignore_it():
    metric = MultiTaskMetrics(SPECS, name="attrs")
    y_true, y_pred = make_batch(np.random.default_rng(2), 8)
    with pytest.raises(ValueError, match="takes no sample_weight"):
        metric.update_state(y_true, y_pred, sample_weight=np.ones(8, "float32"))


def test_family_loss_weights_reach_their_tasks_in_every_schema():
    from tfface.models.multitask_model import task_loss_weights
    from tfface.schema import get_schema

    weights = {"attributes": 1.5, "gender": 2.0, "age_group": 0.5, "Smiling": 3.0}
    for name, gender_task in (("fused", "gender"), ("celeba", "Male")):
        schema = get_schema(name)
        by_task = dict(zip(schema.task_names, task_loss_weights(schema, weights)))
        assert by_task[gender_task] == 2.0  # CelebA's Male is the celeba schema's gender task
        assert by_task["Smiling"] == 3.0 and by_task["Bald"] == 1.5
        if "age_group" in by_task:
            assert by_task["age_group"] == 0.5


def test_a_multiclass_task_no_example_labels_reads_nan_not_zero():
    from tfface.metrics import MultiTaskMetrics

    metric = MultiTaskMetrics([("Smiling", 2, 0.5, "binary"), ("age_group", 3, 0.5, "multiclass")])
    metric.update_state(
        {"Smiling": np.array([1.0, 0.0]), "age_group": np.array([-1, -1])},
        {"Smiling": np.array([0.9, 0.2]), "age_group": np.full((2, 3), 1 / 3)},
    )
    result = {k: float(v) for k, v in metric.result().items()}
    assert result["mean_accuracy"] == 1.0
    assert np.isnan(result["age_group_accuracy"]) and np.isnan(result["age_group_one_off"])
    metric.update_state({"age_group": np.array([2])}, {"age_group": np.array([[0.1, 0.2, 0.7]])})
    assert float(metric.result()["age_group_accuracy"]) == 1.0
