"""Tests for tfface.evaluation: metrics, subgroups, outputs, calibration."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tfface.data.source import FaceSource
from tfface.evaluation import apply_thresholds
from tfface.evaluation import calibrate_thresholds
from tfface.evaluation import compute_metrics
from tfface.evaluation import evaluate_model
from tfface.evaluation import format_metrics
from tfface.evaluation import load_model
from tfface.evaluation import subgroup_metrics
from tfface.evaluation.calibration import best_threshold
from tfface.schema import SYNTHETIC_ATTRIBUTES
from tfface.schema import Schema
from tfface.schema import Task
from tfface.schema import get_schema

from harness import randomize_weights

SIZE = 32


@pytest.fixture(scope="module")
def tiny_model():
    import tfface.models
    from tfface.config import ModelConfig

    return tfface.models.GatedMultiTaskModel(
        schema=get_schema("synthetic"),
        config=ModelConfig(image_size=SIZE, backbone_widths=(8, 16, 32, 64), embedding_dim=16),
    )


def synthetic_source(n=24, seed=0):
    rng = np.random.default_rng(seed)
    columns = {a: rng.integers(0, 2, n).astype(np.int32) for a in SYNTHETIC_ATTRIBUTES}
    columns["age"] = rng.integers(0, 90, n).astype(np.int32)
    columns["Smiling"][:3] = -1  # some missing labels
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    return FaceSource(name="random_synthetic", format="synthetic", columns=columns, images=images)


def utkface_source(n=12, seed=1):
    rng = np.random.default_rng(seed)
    columns = {
        "age": rng.integers(0, 90, n).astype(np.int32),
        "male": rng.integers(0, 2, n).astype(np.int32),
        "race": rng.integers(0, 5, n).astype(np.int32),
    }
    images = rng.integers(0, 256, (n, SIZE + 8, SIZE, 3), dtype=np.uint8)
    return FaceSource(name="random_utkface", format="utkface", columns=columns, images=images)


def one_hot(classes, num_classes):
    probs = np.full((len(classes), num_classes), 0.01, np.float32)
    probs[np.arange(len(classes)), classes] = 0.9
    return probs


# --- metrics -----------------------------------------------------------------------


def hand_example():
    schema = Schema(
        [
            Task("a"),
            Task("b", threshold=0.3),
            Task("c"),
            Task("age_group", kind="multiclass", classes=[str(i) for i in range(9)]),
            Task("gender", classes=("female", "male")),
        ]
    )
    labels = {
        "a": np.array([1, 0, 1, -1, 0, 1], np.float32),
        "b": np.array([0, 0, 1, 1, -1, -1], np.float32),
        "c": np.full(6, -1, np.float32),
        "age_group": np.array([3, 4, -1, 0, 8, 5], np.int32),
        "gender": np.full(6, -1, np.float32),
    }
    probs = {
        "a": np.array([0.9, 0.2, 0.4, 0.7, 0.6, 0.8], np.float32),
        "b": np.array([0.1, 0.35, 0.5, 0.2, 0.9, 0.9], np.float32),
        "c": np.full(6, 0.9, np.float32),
        "age_group": one_hot([3, 5, 7, 2, 8, 8], 9),
        "gender": np.full(6, 0.9, np.float32),
    }
    return schema, labels, probs


def test_compute_metrics_matches_hand_computed_values():
    schema, labels, probs = hand_example()
    metrics = compute_metrics(schema, labels, probs)
    a, b = metrics["tasks"]["a"], metrics["tasks"]["b"]
    # a: truth [1,0,1,0,1] vs pred [1,0,0,1,1] (row 3 unlabelled).
    assert a["n_labelled"] == 5 and a["positives"] == 3
    assert a["accuracy"] == pytest.approx(3 / 5)
    assert a["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # b uses its schema threshold 0.3: pred [0,1,1,0] vs truth [0,0,1,1].
    assert b["accuracy"] == pytest.approx(0.5) and b["balanced_accuracy"] == pytest.approx(0.5)
    assert b["threshold"] == 0.3
    # c and gender are unlabelled: left out of the tasks and of the means.
    assert "c" not in metrics["tasks"] and "gender" not in metrics["tasks"]
    assert "gender_accuracy" not in metrics
    assert metrics["n_binary_tasks"] == 2
    assert metrics["mean_accuracy"] == pytest.approx((0.6 + 0.5) / 2)
    assert metrics["mean_balanced_accuracy"] == pytest.approx((7 / 12 + 0.5) / 2)
    # age: (3,3) exact, (4,5) one off, (0,2) wrong, (8,8) exact, (5,8) wrong.
    assert metrics["age_group_exact"] == pytest.approx(2 / 5)
    assert metrics["age_group_one_off"] == pytest.approx(3 / 5)
    assert metrics["tasks"]["age_group"]["exact"] == pytest.approx(2 / 5)
    assert np.sum(metrics["tasks"]["age_group"]["confusion"]) == 5
    assert metrics["n_images"] == 6


def test_compute_metrics_threshold_override_and_bad_input():
    schema, labels, probs = hand_example()
    metrics = compute_metrics(schema, labels, probs, thresholds={"a": 0.95})
    assert metrics["tasks"]["a"]["accuracy"] == pytest.approx(2 / 5)  # all predicted negative
    assert metrics["tasks"]["a"]["balanced_accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not in the schema"):
        compute_metrics(schema, labels, probs, thresholds={"nope": 0.4})
    probs["a"] = probs["a"][:4]
    with pytest.raises(ValueError, match="'a'"):
        compute_metrics(schema, labels, probs)


@pytest.mark.parametrize("task", ["a", "age_group"])
def test_nan_predictions_are_refused_not_scored(task):
    # NaN read as "negative" and argmax as class 0: plausible numbers from a diverged model.
    schema, labels, probs = hand_example()
    probs[task] = np.array(probs[task], np.float32)
    probs[task][1] = np.nan
    with pytest.raises(ValueError, match=f"task '{task}': the model gave NaN or infinite probabilities for 1 of 6 images"):
        compute_metrics(schema, labels, probs)


def test_subgroup_counts_add_up():
    schema = get_schema("synthetic")
    rng = np.random.default_rng(3)
    n = 200
    labels, probs = {}, {}
    for task in schema:
        if task.is_binary:
            labels[task.name] = rng.integers(0, 2, n).astype(np.float32)
            probs[task.name] = rng.random(n).astype(np.float32)
        else:
            labels[task.name] = rng.integers(0, task.num_classes, n).astype(np.int32)
            probs[task.name] = rng.dirichlet(np.ones(task.num_classes), n).astype(np.float32)
        labels[task.name][rng.random(n) < 0.2] = -1
    rows = subgroup_metrics(schema, labels, probs)
    assert {r["by"] for r in rows} == {"gender", "age_group"}
    assert not any(r["by"] == "gender" and r["attribute"] == "gender" for r in rows)
    group_task = {"gender": "gender", "age_group": "age_group"}
    for by, task_name in group_task.items():
        for attribute in [t.name for t in schema.binary_tasks if t.name != task_name]:
            part = [r for r in rows if r["by"] == by and r["attribute"] == attribute]
            both = (labels[attribute] != -1) & (labels[task_name] != -1)
            assert sum(r["n"] for r in part) == int(both.sum())
            assert sum(r["positives"] for r in part) == int(np.sum(labels[attribute][both] == 1))
    # One row by hand: Smiling among women.
    row = next(r for r in rows if r["by"] == "gender" and r["attribute"] == "Smiling" and r["subgroup"] == "female")
    member = (labels["gender"] == 0) & (labels["Smiling"] != -1)
    expected = np.mean((probs["Smiling"][member] >= 0.5) == (labels["Smiling"][member] == 1))
    assert row["accuracy"] == pytest.approx(expected)


def test_subgroups_use_male_in_the_celeba_schema():
    schema = get_schema("celeba")
    n = 10
    labels = {t.name: np.full(n, -1, np.float32) for t in schema}
    probs = {t.name: np.full(n, 0.7, np.float32) for t in schema}
    labels["Male"] = np.array([0, 1] * 5, np.float32)
    labels["Smiling"] = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, -1], np.float32)
    rows = subgroup_metrics(schema, labels, probs)
    assert {(r["subgroup"], r["n"]) for r in rows} == {("female", 5), ("male", 4)}
    assert compute_metrics(schema, labels, probs)["gender_accuracy"] == pytest.approx(0.5)


# --- evaluate_model -----------------------------------------------------------------------


def test_evaluate_model_writes_metrics_plots_and_report(tiny_model, tmp_path):
    out = tmp_path / "eval"
    metrics = evaluate_model(tiny_model, [synthetic_source(), utkface_source()], out, batch_size=16)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    for key in ("mean_accuracy", "mean_balanced_accuracy", "n_images", "age_group_exact",
                "age_group_one_off", "gender_accuracy", "tasks", "subgroups", "plots"):
        assert key in saved, key
    assert saved["n_images"] == 36
    assert saved["tasks"]["Smiling"]["n_labelled"] == 21
    assert saved["tasks"]["gender"]["n_labelled"] == 36
    for scores in saved["tasks"].values():
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["balanced_accuracy"] <= 1.0
    assert set(saved["per_source"]) == {"0:random_synthetic", "1:random_utkface"}
    assert {"accuracy.png", "confusion_age_group.png", "subgroups_gender.png"} <= set(saved["plots"])
    for name in saved["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "(accuracy.png)" in report and "| Smiling |" in report and "### By gender" in report
    card = (out / "model_card.md").read_text()
    assert "non-commercial research" in card and "UTKFace" in card
    assert "### By subgroup" in card and "| gender | female |" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert "mean balanced accuracy" in format_metrics(saved)


def test_evaluate_model_replaces_an_earlier_evaluation_whole_and_nothing_else(tiny_model, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    (out / "group_masks.png").write_bytes(b"from an earlier, mask-guided model")
    evaluate_model(tiny_model, synthetic_source(n=8), out, batch_size=8)
    assert "group_masks.png" not in {p.name for p in out.iterdir()}  # no stale file beside the new ones
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 8
    # A folder holding anything else is refused before any work, untouched.
    (out / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match=r"holds other files \(notes.txt\)"):
        evaluate_model(tiny_model, synthetic_source(n=8), out, batch_size=8)
    assert sorted(p.name for p in out.iterdir()) == before and (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(NotADirectoryError, match="notes.txt is a file"):
        evaluate_model(tiny_model, synthetic_source(n=8), out / "notes.txt", batch_size=8)


def test_a_bad_out_folder_is_refused_before_the_model_loads_or_calibrates(tmp_path, capsys):
    from tfface.cli import main as cli_main

    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.md").write_text("a report without its metrics")
    missing_model = tmp_path / "no_such_model.keras"
    assert cli_main(["evaluate", "--model", str(missing_model), "--data", "synthetic:4", "--out", str(out),
                     "--calibrate", str(tmp_path / "calibrated.keras")]) == 2
    assert "holds report.md but no metrics.json, so it is not a whole earlier output" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["report.md"]


def test_model_card_takes_licences_from_the_recorded_source_formats(tiny_model, tmp_path):
    from tfface.evaluation.model_card import model_card

    run = tmp_path / "run"
    run.mkdir()
    # A folder name that says nothing about the data: only the recorded format does.
    summary = {"sources": [{"path": "faces_v2", "name": "faces_v2", "format": "utkface", "train_examples": 10}],
               "train_examples": 10}
    (run / "train_summary.json").write_text(json.dumps(summary))
    card = model_card(tiny_model, {"model": {"path": str(run / "model.keras")}, "data": []})
    assert "faces_v2" in card and "UTKFace: non-commercial" in card
    assert "CelebA (MMLAB" not in card
    assert "under-represents Black faces" in card and "Trained from scratch on 10 images" in card


def test_the_model_card_of_a_model_trained_on_synthetic_faces_says_so(tiny_model, tmp_path):
    from tfface.evaluation.model_card import model_card

    run = tmp_path / "run"
    run.mkdir()
    summary = {"sources": [{"path": "synthetic:200", "name": "synthetic", "format": "synthetic"}], "train_examples": 170}
    (run / "train_summary.json").write_text(json.dumps(summary))
    card = model_card(tiny_model, {"model": {"path": str(run / "model.keras")}, "data": [], "tfface_version": "9.9"})
    assert "synthetic faces only" in card and "Evaluated with tfface 9.9." in card
    assert "under-represents Black faces" not in card and "non-commercial research only" not in card
    assert "Trained from scratch" not in card


def test_evaluate_model_failure_leaves_previous_outputs(tiny_model, tmp_path, monkeypatch):
    from tfface.evaluation import plots

    (tmp_path / "metrics.json").write_text("{}")

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "subgroup_png", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        evaluate_model(tiny_model, synthetic_source(n=8), tmp_path, batch_size=8)
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_an_image_that_does_not_decode_is_named_and_earlier_outputs_kept(tiny_model, tmp_path):
    from tfface.data.synthetic import write_synthetic_folder

    folder = write_synthetic_folder(synthetic_source(n=8), tmp_path / "faces")
    victim = sorted((folder / "images").iterdir())[3]
    data = victim.read_bytes()
    # Header, length and end chunk (IEND) pass the cheap checks; the pixels do not decode.
    victim.write_bytes(data[:40] + bytes(len(data) - 52) + data[-12:])
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=f"corrupt image file.*{victim.name}"):
        evaluate_model(tiny_model, str(folder), out, batch_size=4)
    assert (out / "metrics.json").read_text() == "{}"


def test_skip_bad_images_scores_the_rest_and_names_what_it_left_out(tiny_model, tmp_path):
    from tfface.data.synthetic import write_synthetic_folder

    folder = write_synthetic_folder(synthetic_source(n=8), tmp_path / "faces")
    victims = sorted((folder / "images").iterdir())[2:4]
    victims[0].write_bytes(b"")
    data = victims[1].read_bytes()
    victims[1].write_bytes(data[:40] + bytes(len(data) - 40))
    metrics = evaluate_model(tiny_model, str(folder), tmp_path / "eval", batch_size=4, skip_bad_images=True)
    assert metrics["n_images"] == 6
    (problem,) = metrics["data"][0]["problems"]
    assert problem.startswith("left out 2 of 8 image(s) that do not decode")
    assert all(str(victim) in problem for victim in victims)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["data"][0]["problems"] == [problem]
    assert f"- **Reading faces:** {problem}" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty image file: "), (b"hello, not pixels", r"not an image file \(JPEG, PNG.*\): ")],
)
def test_a_file_that_is_no_image_is_named_in_one_line(tiny_model, tmp_path, content, message):
    from tfface.data.synthetic import write_synthetic_folder

    folder = write_synthetic_folder(synthetic_source(n=8), tmp_path / "faces")
    victim = sorted((folder / "images").iterdir())[2]
    victim.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{message}{re.escape(str(victim))}; fix or remove it \\(or leave out every such image: .*--skip-bad-images\\)$"):
        evaluate_model(tiny_model, str(folder), tmp_path / "eval", batch_size=4)


def test_a_folder_named_like_an_image_is_no_image(tmp_path):
    from tfface.data.sources import open_source
    from tfface.data.synthetic import write_synthetic_folder

    folder = write_synthetic_folder(synthetic_source(n=8), tmp_path / "faces")
    victim = sorted((folder / "images").iterdir())[2]
    victim.unlink()
    victim.mkdir()
    with pytest.raises(ValueError, match=f"attributes.csv, line 4: image file not found: {re.escape(str(victim))} "):
        open_source(str(folder))


def test_bad_rows_stop_evaluate_and_train_unless_they_are_told_to_skip_them(tiny_model, tmp_path, capsys):
    from tfface.cli import main as cli_main
    from tfface.config import ExperimentConfig
    from tfface.data.synthetic import write_synthetic_folder
    from tfface.training.trainer import load_sources

    folder = write_synthetic_folder(synthetic_source(n=12), tmp_path / "faces")
    victim = sorted((folder / "images").iterdir())[2]
    victim.unlink()
    model_file = tmp_path / "m.keras"
    tiny_model.save(model_file)
    evaluate = ["evaluate", "--model", str(model_file), "--data", str(folder), "--out", str(tmp_path / "eval")]
    assert cli_main(evaluate) == 2
    err = capsys.readouterr().err
    assert f"image file not found: {victim}" in err and "--skip-bad-rows" in err
    assert not (tmp_path / "eval").exists()
    assert cli_main(evaluate + ["--skip-bad-rows"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == 11
    assert any("skipped 1 bad row(s)" in p and victim.name in p for p in metrics["data"][0]["problems"])

    experiment = {"data": {"sources": [{"path": str(folder)}], "schema": "synthetic", "image_size": SIZE},
                  "model": {"image_size": SIZE}}
    with pytest.raises(ValueError, match="image file not found"):
        load_sources(ExperimentConfig.from_dict(experiment).data)
    experiment["data"]["sources"][0]["skip_bad_rows"] = True
    train, val = load_sources(ExperimentConfig.from_dict(experiment).data)
    assert len(train[0]) + len(val[0]) == 11 and train[0].problems
    experiment["data"]["sources"][0]["skip_bad_rows"] = "yes"
    with pytest.raises(ValueError, match=r"data.sources\[0\].skip_bad_rows must be true or false"):
        ExperimentConfig.from_dict(experiment)


def test_data_without_any_label_value_is_refused_before_predicting(tiny_model, tmp_path, monkeypatch):
    import tfface.evaluation.evaluate as evaluate_lib

    source = synthetic_source(n=6)
    source.columns = {k: np.full_like(v, -1) for k, v in source.columns.items()}
    monkeypatch.setattr(evaluate_lib, "collect_predictions", lambda *a, **k: pytest.fail("predicted anyway"))
    with pytest.raises(ValueError, match="has no label values"):
        evaluate_model(tiny_model, source, tmp_path / "out", batch_size=4)


def test_what_reading_a_source_skipped_is_recorded(tiny_model, tmp_path):
    source = synthetic_source(n=8)
    source.problems.append("2 image(s) skipped: file name does not parse (example)")
    metrics = evaluate_model(tiny_model, source, tmp_path / "out", batch_size=8)
    assert metrics["data"][0]["problems"] == ["2 image(s) skipped: file name does not parse (example)"]
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["data"][0]["problems"] == metrics["data"][0]["problems"]


def test_missing_model_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model.keras"
    with pytest.raises(FileNotFoundError, match="no_such_model.keras"):
        evaluate_model(missing, synthetic_source(n=4), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_keras_file_of_another_project_is_named(tmp_path):
    import zipfile

    broken = tmp_path / "no_config.keras"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(ValueError, match="no_config.keras: cannot load it as a tfface model"):
        load_model(broken)


def test_evaluate_scores_each_image_with_its_own_prediction_and_labels(tmp_path):
    # compute_metrics is checked on hand-made numbers above; this checks what
    # evaluate_model feeds it. Predictions out of order within a batch went
    # unnoticed: the untrained model answers about the same for every image.
    import tfface.models
    from tfface.config import ModelConfig
    from tfface.evaluation.evaluate import collect_predictions

    schema = get_schema("synthetic")
    model = randomize_weights(tfface.models.GatedMultiTaskModel(
        schema=schema, config=ModelConfig(image_size=SIZE, backbone_widths=(8, 16, 32, 64), embedding_dim=16),
    ))
    source = synthetic_source(n=24)  # images at the model's size: the pipeline leaves them as they are
    expected_labels = schema.encode_labels("synthetic", source.columns, 24)
    expected_probs = model.predict_tasks(source.images.astype(np.float32))
    assert max(np.abs(p - p[::-1]).max() for p in expected_probs.values()) > 0.01  # answers differ per image

    labels, probs, extras = collect_predictions(model, [source], batch_size=16)
    for task in schema:
        np.testing.assert_array_equal(labels[task.name], expected_labels[task.name], err_msg=task.name)
        np.testing.assert_allclose(probs[task.name], expected_probs[task.name], atol=1e-5, err_msg=task.name)
    np.testing.assert_array_equal(extras["_source"], np.zeros(24))

    metrics = evaluate_model(model, [source], tmp_path / "eval", batch_size=16)
    direct = json.loads(json.dumps(compute_metrics(schema, expected_labels, expected_probs)))
    assert metrics["tasks"] == direct["tasks"]
    assert metrics["mean_accuracy"] == pytest.approx(direct["mean_accuracy"], abs=1e-6)


def test_evaluate_limit_scores_a_fixed_hashed_subset_and_records_it(tiny_model, tmp_path, capsys):
    from tfface.cli import main as cli_main
    from tfface.data.sources import open_source
    from tfface.data.synthetic import write_synthetic_folder
    from tfface.evaluation.evaluate import limit_sources

    folder = write_synthetic_folder(synthetic_source(n=12), tmp_path / "faces")
    model_file = tmp_path / "m.keras"
    tiny_model.save(model_file)
    base = ["evaluate", "--model", str(model_file), "--data", str(folder), "--batch-size", "4"]
    saved = []
    for run in ("a", "b"):
        assert cli_main(base + ["--out", str(tmp_path / run), "--limit", "5"]) == 0
        saved.append(json.loads((tmp_path / run / "metrics.json").read_text()))
    assert "limit: 5 of 12 images scored (limit 5), a fixed subset" in capsys.readouterr().out
    first, second = saved
    assert first["n_images"] == 5 and first["tasks"]["gender"]["n_labelled"] == 5
    assert first["limit"]["requested"] == 5 and first["limit"]["applied"] is True
    assert first["limit"]["n_images_scored"] == 5 and first["limit"]["n_images_available"] == 12
    assert first["data"][0]["n_images"] == 5 and first["data"][0]["n_images_available"] == 12
    assert first["tasks"] == second["tasks"]  # the same images, so the same scores
    assert "- **Limit:** 5 of 12 images scored (limit 5)" in (tmp_path / "a" / "report.md").read_text()

    # The same rows every time, by hash: not the first five in file order,
    # and unmoved when an image that was not chosen leaves the folder.
    source = open_source(str(folder))
    [chosen], _, _ = limit_sources([source], 5)
    [again], _, _ = limit_sources([source], 5)
    names = [Path(p).name for p in chosen.image_paths]
    assert names == [Path(p).name for p in again.image_paths]
    assert names != [Path(p).name for p in source.image_paths[:5]]
    kept = [i for i, p in enumerate(source.image_paths) if Path(p).name not in names][1:]
    kept = sorted(kept + [i for i, p in enumerate(source.image_paths) if Path(p).name in names])
    [fewer], _, _ = limit_sources([source.subset(kept)], 5)
    assert [Path(p).name for p in fewer.image_paths] == names

    # A limit of all the images or more scores all of them and says so.
    assert cli_main(base + ["--out", str(tmp_path / "all"), "--limit", "50"]) == 0
    every = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert every["n_images"] == 12 and every["limit"]["applied"] is False
    assert every["limit"]["n_images_available"] == 12
    assert "- **Limit:** all 12 images scored (limit 50 is not below that)" in (tmp_path / "all" / "report.md").read_text()
    # Without --limit the record says no limit.
    metrics = evaluate_model(tiny_model, synthetic_source(n=6), tmp_path / "none", batch_size=8)
    assert metrics["limit"] is None and metrics["n_images"] == 6


def test_evaluate_limit_below_one_is_refused(tiny_model, tmp_path, capsys):
    from tfface.cli import main as cli_main

    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["evaluate", "--model", "m.keras", "--data", "synthetic:8", "--out", str(tmp_path / "ev"),
                      "--limit", bad])
        assert exit_info.value.code == 2
        assert f"argument --limit: must be >= 1, got {int(bad)}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="limit must be a whole number >= 1, got 0"):
        evaluate_model(tiny_model, synthetic_source(n=4), tmp_path / "ev", limit=0)
    assert not (tmp_path / "ev").exists()


# --- calibration --------------------------------------------------------------------------


def test_calibrated_threshold_separates_the_classes():
    schema = Schema([Task("a"), Task("rare")])
    rng = np.random.default_rng(0)
    positives = rng.uniform(0.25, 0.35, 30)
    negatives = rng.uniform(0.05, 0.15, 50)
    labels = {
        "a": np.concatenate([np.ones(30), np.zeros(50), [-1, -1]]).astype(np.float32),
        "rare": np.array([1, 1] + [0] * 80, np.float32),  # too few positives
    }
    probs = {
        "a": np.concatenate([positives, negatives, [0.99, 0.0]]).astype(np.float32),
        "rare": rng.random(82).astype(np.float32),
    }
    before = compute_metrics(schema, labels, probs)["tasks"]["a"]
    assert before["balanced_accuracy"] == pytest.approx(0.5)  # all below 0.5
    thresholds = calibrate_thresholds(schema, labels, probs)
    assert negatives.max() < thresholds["a"] < positives.min()
    assert thresholds["rare"] == 0.5
    after = compute_metrics(schema.with_thresholds(thresholds), labels, probs)["tasks"]["a"]
    assert after["balanced_accuracy"] == pytest.approx(1.0) and after["accuracy"] == pytest.approx(1.0)


def test_calibration_never_picks_a_threshold_worse_than_a_constant_decision():
    labels = np.array([1, 1, 0, 0], np.float32)
    probs = np.array([0.1, 0.2, 0.8, 0.9], np.float32)  # ranked backwards
    threshold = best_threshold(labels, probs)
    decided = compute_metrics(Schema([Task("a", threshold=threshold)]), {"a": labels}, {"a": probs})
    assert decided["tasks"]["a"]["balanced_accuracy"] == pytest.approx(0.5)  # not 0.25


def test_calibrated_threshold_decides_in_float32_as_evaluation_does():
    below = np.float32(0.7) + np.float32(0)
    above = np.nextafter(below, np.float32(1))  # neighbouring float32 values
    labels = np.array([0, 1, 0, 1], np.float32)
    probs = np.array([below, above, 0.1, 0.9], np.float32)
    threshold = best_threshold(labels, probs)
    assert threshold == float(above)  # no float32 lies between them: p >= the upper one splits them
    decided = compute_metrics(Schema([Task("a", threshold=threshold)]), {"a": labels}, {"a": probs})
    assert decided["tasks"]["a"]["balanced_accuracy"] == pytest.approx(1.0)


def test_precision_objective_picks_smallest_threshold_reaching_target():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)
    probs = np.array([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.65, 0.3], np.float32)
    # Precision 1 needs the negative at 0.65 excluded.
    assert best_threshold(labels, probs, "precision", 1.0) == pytest.approx(0.675)
    # 4 / 5 is reached once the 0.3 negative is excluded.
    assert best_threshold(labels, probs, "precision", 0.8) == pytest.approx(0.45)
    schema = Schema([Task("a")])
    with pytest.warns(UserWarning, match="precision"):
        kept = calibrate_thresholds(
            schema, {"a": np.array([1, 0] * 5, np.float32)}, {"a": np.full(10, 0.5, np.float32)},
            objective="precision", min_per_class=1,
        )
    assert kept == {"a": 0.5}
    with pytest.raises(ValueError, match="objective"):
        calibrate_thresholds(schema, {}, {}, objective="recall")


def test_thresholds_survive_keras_save_and_load(tiny_model, tmp_path):
    model = tiny_model
    original = model.schema
    try:
        apply_thresholds(model, {"Smiling": 0.3, "gender": 0.7})
        assert model.schema["Smiling"].threshold == 0.3
        assert dict(model.attribute_metrics.binary)["Smiling"] == 0.3
        path = tmp_path / "model.keras"
        model.save(path)
        loaded = load_model(tmp_path)  # a run folder holding model.keras
        assert loaded.schema["Smiling"].threshold == 0.3
        assert loaded.schema["gender"].threshold == 0.7
        assert loaded.schema["Eyeglasses"].threshold == 0.5
        assert dict(loaded.attribute_metrics.binary)["gender"] == 0.7
    finally:
        apply_thresholds(model, {t.name: t.threshold for t in original})


def test_a_terminated_evaluation_unwinds_like_ctrl_c():
    # So `replaced_folder` removes its half-written folder on a kill (SIGTERM) too.
    import os
    import signal
    import time

    from tfface.cli import _terminate_unwinds

    import gc

    before = signal.getsignal(signal.SIGTERM)
    # An exception a signal handler raises while a gc callback runs is printed
    # and dropped ("Exception ignored in: <function _xla_gc_callback>": JAX,
    # which the test process loads through its imports, registers one).
    gc.disable()
    try:
        with pytest.raises(KeyboardInterrupt):
            with _terminate_unwinds():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
    finally:
        gc.enable()
    assert signal.getsignal(signal.SIGTERM) is before
