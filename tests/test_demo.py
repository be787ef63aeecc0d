"""The main job end to end, at a tiny size: train, evaluate, export, serve, query."""

import pytest

from tfface.demo import run_demo


@pytest.mark.slow
def test_main_job_runs_end_to_end(tmp_path, capsys):
    result = run_demo(workdir=tmp_path / "demo", num_images=240, epochs=1, image_size=32, query_count=3)
    out = capsys.readouterr().out
    assert "[6/6] per-face results" in out
    assert "server stopped" in out
    # One result per queried face, with every schema task named.
    assert len(result["results"]) == 3
    assert {"Smiling", "Eyeglasses", "gender", "age_group"} <= set(result["results"][0])
    assert result["metrics"]["n_images"] == 500
    assert 0.0 <= result["metrics"]["mean_balanced_accuracy"] <= 1.0
    assert (tmp_path / "demo" / "eval" / "metrics.json").is_file()
    assert result["export_path"].endswith("/1")
    # Each queried face is scored against its labels: 20 binary tasks and the age group.
    assert out.count(" of 21 tasks right") == 3


def test_ground_truth_lines_name_the_wrong_tasks():
    import numpy as np

    from tfface.data.source import FaceSource
    from tfface.demo import _against_ground_truth
    from tfface.schema import AGE_GROUPS, Schema, Task

    schema = Schema([Task("Smiling", sources={"synthetic": "Smiling"}),
                     Task("age_group", kind="multiclass", classes=AGE_GROUPS, sources={"synthetic": "age"})])
    faces = FaceSource(name="f", format="synthetic", columns={"Smiling": np.array([1, -1]), "age": np.array([25, 70])},
                       images=np.zeros((2, 4, 4, 3), np.uint8))
    results = [{"Smiling": {"label": "no"}, "age_group": {"label": "20-29"}},
               {"Smiling": {"label": "yes"}, "age_group": {"label": "70+"}}]
    text = _against_ground_truth(results, schema, faces)
    assert "face 0: 1 of 2 tasks right; wrong: Smiling (true: yes)" in text
    assert "face 1: 1 of 1 tasks right" in text  # Smiling unlabelled there
