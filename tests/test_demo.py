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
