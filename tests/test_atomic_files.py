"""Outputs are written whole or not at all (tfface.atomic_files)."""

import pytest

from tfface.atomic_files import atomic_path
from tfface.atomic_files import replaced_folder
from tfface.atomic_files import write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.jsonl"
    target.write_text("old results\n")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise OSError("disk full")
    assert target.read_text() == "old results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
    write_atomic(target, "new results\n")
    assert target.read_text() == "new results\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]


def test_a_failed_folder_leaves_the_old_one_whole(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError, match="plot failed"):
        with replaced_folder(out, lambda name: name.endswith(".json")) as staging:
            (staging / "metrics.json").write_text("new")
            raise RuntimeError("plot failed")
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("metrics.json", "old")]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]
    with replaced_folder(out, lambda name: name.endswith(".json")) as staging:
        (staging / "report.md").write_text("new")
    assert [p.name for p in out.iterdir()] == ["report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]
