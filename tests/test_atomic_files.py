"""Outputs are written whole or not at all (tfface.atomic_files)."""

import errno
import sys
from pathlib import Path

import pytest

from harness import log_syncs_and_moves
from harness import small_disk
from tfface.atomic_files import atomic_path
from tfface.atomic_files import replaced_folder
from tfface.atomic_files import working_folder
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
        with replaced_folder(out, lambda name: name.endswith(".json"), marker="metrics.json") as staging:
            (staging / "metrics.json").write_text("new")
            raise RuntimeError("plot failed")
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("metrics.json", "old")]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]
    with replaced_folder(out, lambda name: name.endswith(".json"), marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("new")
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("metrics.json", "new")]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_a_replaced_folder_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    events = log_syncs_and_moves(monkeypatch, "replace")
    out = tmp_path / "eval"
    with replaced_folder(out, lambda name: name.endswith(".json"), marker="metrics.json") as staging:
        (staging / "plots").mkdir()
        (staging / "plots" / "a.json").write_text("{}")
        (staging / "metrics.json").write_text("new")
    (index,) = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out)]
    synced = {e[1] for e in events[:index] if e[0] == "sync"}
    assert {str(staging), str(staging / "plots"), str(staging / "plots" / "a.json"), str(staging / "metrics.json")} <= synced
    assert ("sync", str(tmp_path)) in events[index:]


def test_only_an_earlier_output_of_the_same_kind_is_replaced(tmp_path, monkeypatch):
    def accept_png(name):
        return name.endswith(".png")

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"a photo")  # nothing but files the output could hold
    with pytest.raises(FileExistsError, match=r"holds a.png but no metrics.json, so it is not a whole earlier output"):
        with replaced_folder(photos, accept_png, marker="metrics.json"):
            pytest.fail("refused before the block runs")
    assert (photos / "a.png").read_bytes() == b"a photo"
    # A link to an earlier output is followed; the folder holding the
    # working directory is refused.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(earlier)
    with replaced_folder(link, lambda name: name.endswith(".json"), marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("new")
    assert (earlier / "metrics.json").read_text() == "new" and link.is_symlink()
    monkeypatch.chdir(earlier)
    with pytest.raises(ValueError, match="holds the working directory"):
        with replaced_folder(".", lambda name: name.endswith(".json"), marker="metrics.json"):
            pytest.fail("refused before the block runs")


def test_pipes_and_devices_are_written_directly(tmp_path):
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo).read()))
    reader.start()
    write_atomic(fifo, "through the pipe")
    reader.join(10)
    assert received == ["through the pipe"] and fifo.is_fifo()


_WRITER = """
import sys, time
from tfface.atomic_files import replaced_folder
with replaced_folder(sys.argv[1], lambda name: True, marker="metrics.json") as staging:
    (staging / "metrics.json").write_text("half")
    print(staging, flush=True)
    time.sleep(60)  # killed here
"""


@pytest.mark.skipif(sys.platform == "win32", reason="folders are locked with flock")
def test_working_folders_a_killed_run_left_are_removed_and_live_ones_kept(tmp_path):
    import subprocess

    out = tmp_path / "eval"
    killed = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    left = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait()
    assert left.is_dir()
    with replaced_folder(out, lambda name: True, marker="metrics.json") as live:
        assert not left.exists()
        (live / "metrics.json").write_text("new")
        with working_folder(tmp_path, ".eval.tmp-") as other:
            # The folder of a run that is still writing is kept.
            assert live.is_dir() and (live / "metrics.json").read_text() == "new"
            other.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert (out / "metrics.json").read_text() == "new"


@pytest.mark.skipif(sys.platform == "win32", reason="folders are locked with flock")
def test_without_file_locks_nothing_is_taken_for_stale(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # NFS mounted with nolock

    monkeypatch.setattr(fcntl, "flock", no_locks)
    other = tmp_path / ".eval.tmp-other"  # perhaps another process's: nothing can tell
    other.mkdir()
    with replaced_folder(tmp_path / "eval", lambda name: True, marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("new")
    assert other.is_dir() and (tmp_path / "eval" / "metrics.json").read_text() == "new"


def test_leftovers_of_a_killed_save_are_removed_and_nothing_else(tmp_path):
    from tfface.atomic_files import discard_leftovers

    target = tmp_path / "model.keras"
    target.write_bytes(b"model")
    keep = ["model.keras", ".last.keras.x1.tmp.keras", "model.keras.bak", ".model.keras.notes"]
    for name in keep[1:]:
        (tmp_path / name).write_bytes(b"other")
    (tmp_path / ".model.keras.k2j3.tmp.keras").write_bytes(b"PK cut")
    assert discard_leftovers(target) == [".model.keras.k2j3.tmp.keras"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_a_replaced_folder_keeps_its_permissions_and_needs_a_writable_parent(tmp_path, monkeypatch):
    import os

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    out.chmod(0o750)
    with replaced_folder(out, lambda name: name.endswith(".json"), marker="metrics.json") as staging:
        (staging / "metrics.json").write_text("new")
    assert (out.stat().st_mode & 0o777) == 0o750 and (out / "metrics.json").read_text() == "new"
    # The new folder is made beside the old one (root can write anywhere, so
    # the parent's permission is simulated).
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(PermissionError, match=f"cannot write in {tmp_path}: .* its parent folder must be writable"):
        with replaced_folder(out, lambda name: name.endswith(".json"), marker="metrics.json"):
            pytest.fail("refused before the block runs")
    assert (out / "metrics.json").read_text() == "new"


def test_a_full_disk_names_the_output_it_could_not_write_and_keeps_the_old_one(tmp_path):
    # A write() call's ENOSPC names no file: users read "[Errno 28] No space
    # left on device" with no idea which of a command's outputs failed.
    with small_disk(tmp_path / "disk", "64k") as disk:
        target = disk / "metrics.json"
        target.write_text("old")
        with pytest.raises(OSError) as failed:
            write_atomic(target, b"x" * 200_000)
        assert failed.value.errno == errno.ENOSPC
        assert str(failed.value) == (
            f"[Errno 28] No space left on device, writing {target} (anything there before is unchanged)"
        )
        out = disk / "eval"
        with pytest.raises(OSError, match=f"No space left on device, writing {out} "):
            with replaced_folder(out, lambda name: True, marker="metrics.json") as staging:
                (staging / "metrics.json").write_bytes(b"x" * 200_000)
        assert target.read_text() == "old"
        assert sorted(p.name for p in disk.iterdir()) == ["metrics.json"]  # no temporary left


def test_only_failures_of_the_target_itself_are_named_with_it(tmp_path):
    # An evaluation reads its images inside the block that writes its folder:
    # a read error naming an image was reported as "writing OUT". A failure
    # an inner block named (a drawing, inside predict's results file) is not
    # named again.
    from tfface.atomic_files import naming_the_target

    image = str(tmp_path / "faces" / "000001.jpg")
    with pytest.raises(PermissionError) as failed:
        with replaced_folder(tmp_path / "eval", lambda name: True, marker="metrics.json"):
            raise PermissionError(errno.EACCES, "Permission denied", image)
    assert failed.value.filename == image and str(failed.value) == f"[Errno 13] Permission denied: '{image}'"
    with pytest.raises(OSError) as failed:
        with naming_the_target(tmp_path / "faces.jsonl.partial", note="faces.jsonl is unchanged"):
            with naming_the_target(tmp_path / "drawn" / "a.png", note="the drawings before it are kept"):
                raise OSError(errno.ENOSPC, "No space left on device")
    assert str(failed.value) == (
        f"[Errno 28] No space left on device, writing {tmp_path / 'drawn' / 'a.png'} (the drawings before it are kept)"
    )
