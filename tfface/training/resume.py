"""Resuming a killed or stopped run, and refusing a folder a run must not train into.

Apart from the trainer because a run folder's rules are read by more than
training: evaluation (`--split`) and the benchmarks check a run's split
with them, and the callbacks name the backup's files.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

import keras

from tfface.atomic_files import write_atomic
from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.data.splits import split_method_problem

log = logging.getLogger(__name__)

# Here rather than in the trainer: the history a resumed run reads back is
# judged by this score, as early stopping and the best model are.
MONITOR = "val_mean_balanced_accuracy"


# Settings a resumed run may change: where it lives, its name, its budget,
# how long its workers wait for each other, where its decoded images are
# cached (the cache is lossless).
RESUMABLE_CHANGES = (
    "name", "train.output_dir", "train.time_budget_minutes", "train.cluster_wait_minutes", "data.cache",
    # A run stopped at a corrupt image goes on without it (the split is the
    # same: images are left out after it).
    "data.sources.N.skip_bad_images",
)


def _resumable_change(key: str) -> bool:
    return re.sub(r"^data\.sources\.\d+\.", "data.sources.N.", key) in RESUMABLE_CHANGES


def check_resumable(out: Path, config: ExperimentConfig) -> None:
    """Refuses to train into a run folder made with a different config.

    The same config resumes an interrupted run; a different one would
    overwrite `config.yaml` and mix its checkpoints and history with the old
    run's, so it is refused with the settings that differ. A finished run is
    not trained over either.
    """
    existing = out / "config.yaml"
    if not _has_run_outputs(out):
        return  # nothing trained yet (e.g. a first attempt that failed to start): the config may change
    if not existing.is_file():
        raise ConfigError(
            f"{out} holds training outputs but no config.yaml, so it is no tfface run this config can "
            "resume; choose another train.output_dir (or --output-dir) rather than overwrite them"
        )
    try:
        previous = ExperimentConfig.load(existing).to_dict()
    except (ConfigError, OSError) as e:
        raise ConfigError(
            f"{out} holds a run whose config cannot be read ({e}); choose another train.output_dir"
        ) from None
    changed = [key for key in _differing_keys(previous, config.to_dict()) if not _resumable_change(key)]
    if changed:
        raise ConfigError(
            f"{out} holds a run with a different config (differs in {changed}); choose another "
            "train.output_dir (or --output-dir), or remove the old run"
        )
    summary = out / "train_summary.json"
    # A run its time budget stopped keeps its backup to continue from; any
    # other summary is a finished run, even if a kill came before its
    # backup was removed.
    if summary.is_file() and not (is_resuming(out) and _stopped_by(summary) == "time_budget"):
        raise ConfigError(
            f"{out} holds a finished run (train_summary.json); choose another train.output_dir "
            "(or --output-dir), or remove it to train again"
        )
    if config.data.val_fraction > 0:
        # Its first epochs validated on the split it started with: the rest
        # must not validate on others (or train on images it validated on).
        check_run_split(
            out, "resuming would validate the rest of it on other images: train into another train.output_dir "
            "(or --output-dir)"
        )


SPLIT_FILE = "split.json"


def check_run_split(run_dir: Path, consequence: str) -> None:
    """Raises ConfigError (saying `consequence`) unless the run in `run_dir`
    was split by this tfface's split method, so re-creating its split from
    its config gives the images it validated on."""
    problem = split_method_problem(read_split_record(run_dir), f"the run in {run_dir}")
    if problem:
        raise ConfigError(f"{problem}; {consequence}")


def read_split_record(run_dir: Path) -> Optional[dict]:
    """The split record a run wrote when it started, or None (a run of a
    tfface before 0.2.0)."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); it records how the run split its data") from None
    return record if isinstance(record, dict) else {}


def _differing_keys(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for key in sorted(set(old) | set(new), key=str):
            keys += _differing_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [k for i, (a, b) in enumerate(zip(old, new)) for k in _differing_keys(a, b, f"{prefix}{i}.")]
    return [] if old == new else [prefix.rstrip(".")]

def _has_run_outputs(out: Path) -> bool:
    named = ("last.keras", "model.keras", "train_summary.json")
    if is_resuming(out) or any((out / name).exists() for name in named):
        return True
    # A history with no epoch row is what a kill during the first epoch leaves.
    return bool(_history_rows(out / "history.csv"))


def _stopped_by(summary_file: Path) -> Optional[str]:
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return None
    return summary.get("stopped_by") if isinstance(summary, dict) else None


def _history_rows(history_file: Path) -> list:
    """The epoch rows of a run's history.csv (dicts; none when it is absent)."""
    if not history_file.is_file():
        return []
    with open(history_file, newline="") as f:
        return list(csv.DictReader(f))


def is_resuming(out: Path) -> bool:
    backup = out / "backup"
    return backup.is_dir() and any(backup.iterdir())


def monitored_history(history_file: Path) -> list:
    """The monitored validation score of every epoch logged before a resume."""
    return [float(row[MONITOR]) for row in _history_rows(history_file) if row.get(MONITOR) not in (None, "", "nan")]


def trim_history(history_file: Path, start_epoch: int) -> None:
    """Drops the rows of epochs a resumed run does again.

    The history is written before the backup, so a kill between the two (or
    a backup cut short, which falls back to the one before) leaves rows for
    epochs the restored backup had not finished; without trimming they would
    be logged twice and counted twice by early stopping.
    """
    if not history_file.is_file():
        return
    with open(history_file, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]] + [line for line in lines[1:] if _epoch_of(line) < start_epoch]
    if len(kept) < len(lines):
        log.warning("resuming at epoch %d: dropping %d later row(s) of %s", start_epoch + 1, len(lines) - len(kept), history_file)
        write_atomic(history_file, "".join(kept))


def _epoch_of(csv_line: str) -> int:
    try:
        return int(csv_line.split(",", 1)[0])
    except ValueError:
        return -1  # not a row (a blank line): kept


# The files `keras.callbacks.BackupAndRestore` writes in its folder: the
# newest weights and the epoch they hold, and (double_checkpoint) the ones
# before as NAME.bkp.
BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_METADATA = "training_metadata.json"


def readable_weights(path: Path) -> bool:
    """Whether every array of a weights file reads back (a kill or a full
    disk during the write leaves one that h5py opens but cannot read)."""
    import h5py

    def read(name, item):
        if isinstance(item, h5py.Dataset):
            item[()]
        return None  # anything else would stop the visit

    try:
        with h5py.File(path, "r") as f:
            f.visititems(read)
    except Exception:  # h5py raises OSError, RuntimeError, KeyError or ValueError here
        return False
    return True


def settle_backup(backup_dir: Path) -> None:
    """Leaves a run's backup folder as one `BackupAndRestore` can load, or
    none. A newest backup that does not read is replaced by the one before
    (Keras does this itself only when loading raises OSError; a file cut
    short by a full disk raises other errors). A backup with no finished
    epoch (the first one, torn) is removed: the run starts again. One with
    epochs but nothing readable is left for `restore_backup` to name. A
    newest backup whose metadata does not read goes back to the pair before."""
    latest = backup_dir / BACKUP_WEIGHTS
    earlier = backup_dir / (BACKUP_WEIGHTS + ".bkp")
    metadata = backup_dir / BACKUP_METADATA
    earlier_metadata = backup_dir / (BACKUP_METADATA + ".bkp")
    if latest.is_file() and metadata.is_file() and backup_epoch(metadata) is None:
        # Keras empties the file before writing it: a kill in between.
        if earlier.is_file() and readable_weights(earlier) and backup_epoch(earlier_metadata) is not None:
            log.warning("the newest resume backup's %s does not read (cut short); resuming from the one before", metadata.name)
            shutil.copyfile(earlier, latest)
            shutil.copyfile(earlier_metadata, metadata)
        return
    if not latest.is_file() or readable_weights(latest):
        return
    if earlier.is_file() and readable_weights(earlier):
        log.warning("the newest resume backup %s does not read (cut short); resuming from the one before", latest)
        shutil.copyfile(earlier, latest)
        if earlier_metadata.is_file():
            shutil.copyfile(earlier_metadata, metadata)
        elif metadata.is_file():
            metadata.unlink()
    elif not metadata.is_file() and not earlier_metadata.is_file():
        log.warning("the resume backup %s holds no finished epoch (cut short); the run starts again", latest)
        shutil.rmtree(backup_dir)


def backup_epoch(metadata: Path) -> Optional[int]:
    """The epoch a backup's `training_metadata.json` records, or None when
    it is missing or does not read."""
    try:
        epoch = json.loads(metadata.read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def restore_backup(backup: keras.callbacks.BackupAndRestore, model) -> int:
    """Restores the run's backup now (fit restores the same one again) and
    returns the epoch the resumed run starts at."""
    backup.set_model(model)
    try:
        backup.on_train_begin()
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(
            f"the resume backup in {backup.backup_dir} cannot be read ({e}); remove that folder to "
            "train this run again from the start"
        ) from None
    return int(getattr(model, "_initial_epoch", None) or 0)
