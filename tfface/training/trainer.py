"""`train(config)`: the whole training run behind `tfface train --config`.

Reads and splits the sources, builds the fused pipeline and the model named
by the config, and runs `model.fit` with the callbacks a long run needs:
a backup every epoch so a killed run resumes where it stopped (model,
optimizer and epoch restored by `keras.callbacks.BackupAndRestore`, which
keeps the previous backup too, for a kill during the write; the
best score so far and early stopping's count from `history.csv`), the
best model by validation mean balanced accuracy, TensorBoard logs, a CSV
history, early stopping and a wall-clock budget.

Everything lands in `train.output_dir`:
`config.yaml`, `model.keras` (best), `last.keras`, `history.csv`,
`logs/` (TensorBoard), `backup/` (resume state, removed after success),
`train_summary.json`. Nothing is written before the data opens, and a
folder holding a finished run, or a run with a different config, is
refused, not overwritten.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

import tfface
from tfface.atomic_files import claimed_folder
from tfface.atomic_files import closing_files_of_a_failed_write
from tfface.atomic_files import discard_leftovers
from tfface.atomic_files import estimated_weights_file_bytes
from tfface.atomic_files import require_free_space
from tfface.atomic_files import save_model_atomic
from tfface.atomic_files import write_atomic
from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.data.pipeline import choose_cache
from tfface.data.pipeline import drop_undecodable_images
from tfface.data.pipeline import make_dataset
from tfface.data.pipeline import naming_undecodable_images
from tfface.data.splits import split_method_problem
from tfface.data.splits import split_record
from tfface.models.backbones import local_weights_file
from tfface.models.build import build_model
from tfface.schema import get_schema
from tfface.training.optimizer import make_optimizer

log = logging.getLogger(__name__)

MONITOR = "val_mean_balanced_accuracy"


def load_sources(data_config):
    """Opens and splits every configured source: (train list, val list)."""
    from tfface.data.sources import open_source
    from tfface.data.splits import split_source

    train, val = [], []
    for source_config in data_config.sources:
        options = {"image_size": data_config.image_size, "skip_bad_rows": source_config.skip_bad_rows}
        if source_config.landmarks:
            options["landmarks_file"] = source_config.landmarks
        source = open_source(source_config.path, **options)
        if data_config.val_fraction <= 0:
            train.append(drop_undecodable_images(source) if source_config.skip_bad_images else source)
            continue
        parts = split_source(source, val_fraction=data_config.val_fraction, seed=data_config.split_seed)
        if source_config.skip_bad_images:
            # Left out after the split, which stays that of a run that stopped at them.
            parts = drop_undecodable_images(source, parts)
        for side in ("train", "val"):
            if len(parts[side]) == 0:
                raise ConfigError(
                    f"{source_config.path}: the split by person (data.val_fraction {data_config.val_fraction:g}) "
                    f"leaves no {side} images of {len(source)}; use more images or another data.val_fraction"
                )
        train.append(parts["train"])
        val.append(parts["val"])
    return train, val


def check_mask_supervision(config: ExperimentConfig, train_sources) -> Optional[list]:
    """How many training images of each source have landmarks, when the
    model learns its masks from them (None otherwise).

    The mask predictor of a mask-guided model is supervised by masks drawn
    from landmarks; without any it would stay untrained and still be used
    (or frozen after a pretraining on nothing). No landmarks at all is an
    error; some images without them is a warning naming the counts.
    """
    model = config.model
    if model.type != "mask_guided" or model.fusion == "global":
        return None
    if model.mask_loss_weight <= 0 and config.train.mask_pretrain_epochs <= 0:
        return None
    coverage = []
    for cfg, source in zip(config.data.sources, train_sources):
        with_landmarks = 0 if source.landmarks is None else int(np.isfinite(source.landmarks).all(axis=(1, 2)).sum())
        coverage.append({"path": str(cfg.path), "train_examples": len(source), "with_landmarks": with_landmarks})
    total = sum(c["train_examples"] for c in coverage)
    found = sum(c["with_landmarks"] for c in coverage)
    counts = "; ".join(f"{c['path']}: {c['with_landmarks']} of {c['train_examples']}" for c in coverage)
    if found == 0:
        raise ConfigError(
            f"the mask-guided model learns its face-part masks from landmarks, and none of the {total} training "
            f"images has any ({counts}): run `tfface data annotate FOLDER` for each source first, or give a "
            "source's landmarks file with landmarks: FILE"
        )
    if found < total:
        log.warning(
            "mask supervision: %d of %d training images have landmarks (%s); the others train without the mask loss",
            found, total, counts,
        )
    return coverage


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
    if summary.is_file() and not (_is_resuming(out) and _stopped_by(summary) == "time_budget"):
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


def training_labels(schema, sources) -> dict:
    """Task name -> labels of every training example (-1 where missing)."""
    parts = [schema.encode_labels(s.format, s.columns, len(s)) for s in sources]
    return {task.name: np.concatenate([p[task.name] for p in parts]) for task in schema}


def _has_run_outputs(out: Path) -> bool:
    named = ("last.keras", "model.keras", "train_summary.json")
    if _is_resuming(out) or any((out / name).exists() for name in named):
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


def _is_resuming(out: Path) -> bool:
    backup = out / "backup"
    return backup.is_dir() and any(backup.iterdir())


def _monitored_history(history_file: Path) -> list:
    """The monitored validation score of every epoch logged before a resume."""
    return [float(row[MONITOR]) for row in _history_rows(history_file) if row.get(MONITOR) not in (None, "", "nan")]


def _trim_history(history_file: Path, start_epoch: int) -> None:
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


def _readable_weights(path: Path) -> bool:
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


def _settle_backup(backup_dir: Path) -> None:
    """Leaves a run's backup folder as one `BackupAndRestore` can load, or
    none. A newest backup that does not read is replaced by the one before
    (Keras does this itself only when loading raises OSError; a file cut
    short by a full disk raises other errors). A backup with no finished
    epoch (the first one, torn) is removed: the run starts again. One with
    epochs but nothing readable is left for `_restore_backup` to name. A
    newest backup whose metadata does not read goes back to the pair before."""
    latest = backup_dir / BACKUP_WEIGHTS
    earlier = backup_dir / (BACKUP_WEIGHTS + ".bkp")
    metadata = backup_dir / BACKUP_METADATA
    earlier_metadata = backup_dir / (BACKUP_METADATA + ".bkp")
    if latest.is_file() and metadata.is_file() and _backup_epoch(metadata) is None:
        # Keras empties the file before writing it: a kill in between.
        if earlier.is_file() and _readable_weights(earlier) and _backup_epoch(earlier_metadata) is not None:
            log.warning("the newest resume backup's %s does not read (cut short); resuming from the one before", metadata.name)
            shutil.copyfile(earlier, latest)
            shutil.copyfile(earlier_metadata, metadata)
        return
    if not latest.is_file() or _readable_weights(latest):
        return
    if earlier.is_file() and _readable_weights(earlier):
        log.warning("the newest resume backup %s does not read (cut short); resuming from the one before", latest)
        shutil.copyfile(earlier, latest)
        if earlier_metadata.is_file():
            shutil.copyfile(earlier_metadata, metadata)
        elif metadata.is_file():
            metadata.unlink()
    elif not metadata.is_file() and not earlier_metadata.is_file():
        log.warning("the resume backup %s holds no finished epoch (cut short); the run starts again", latest)
        shutil.rmtree(backup_dir)


def _backup_epoch(metadata: Path) -> Optional[int]:
    """The epoch a backup's `training_metadata.json` records, or None when
    it is missing or does not read."""
    try:
        epoch = json.loads(metadata.read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) else None


def _restore_backup(backup: keras.callbacks.BackupAndRestore, model) -> int:
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


class ResumedEarlyStopping(keras.callbacks.EarlyStopping):
    """Early stopping on `MONITOR` that counts the epochs of the run before a
    resume (`earlier` scores, oldest first) as Keras would have."""

    def __init__(self, earlier, patience):
        super().__init__(monitor=MONITOR, mode="max", patience=patience, restore_best_weights=False)
        self.earlier = list(earlier)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.best, self.wait = self._replayed()

    def _replayed(self):
        best, wait = None, 0
        for score in self.earlier:
            wait += 1
            if best is None or score - self.min_delta > best:
                best, wait = score, 0
        return best, wait

    def patience_spent(self) -> bool:
        """Whether Keras had stopped the run at its last logged epoch (the
        interrupted run was over, only its summary was missing)."""
        return len(self.earlier) > 1 and self._replayed()[1] >= self.patience


class BackupSpaceCheck(keras.callbacks.Callback):
    """Refuses, with ENOSPC, a resume backup the disk cannot hold, just
    before `BackupAndRestore` writes it: HDF5 crashed the process
    (segfault) when the disk filled in the middle of that file. The backup
    copies the newest file over the one before, then rewrites the newest
    in place, so that needs room for one more file, less the one before."""

    def __init__(self, backup_dir):
        super().__init__()
        self.backup_dir = Path(backup_dir)

    def on_epoch_end(self, epoch, logs=None):
        newest = self.backup_dir / BACKUP_WEIGHTS
        before = self.backup_dir / (BACKUP_WEIGHTS + ".bkp")
        variables = list(self.model.weights) + list(getattr(self.model.optimizer, "variables", None) or [])
        size = newest.stat().st_size if newest.is_file() else estimated_weights_file_bytes(variables)
        require_free_space(
            self.backup_dir, size, "the resume backup",
            freed=before.stat().st_size if before.is_file() else 0,
            hint="free some space and run the same command again (training resumes from the last backup)",
        )


class AtomicModelCheckpoint(keras.callbacks.Callback):
    """Saves the model after each epoch, or with `monitor` only when that
    score beats the best so far (higher is better), as a whole `.keras`
    file or not at all: Keras's `ModelCheckpoint` writes into its target,
    so a kill or a full disk during the save destroyed the best model of
    the epochs before."""

    def __init__(self, path, monitor: Optional[str] = None, initial_value_threshold: Optional[float] = None):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.best = initial_value_threshold

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor is not None:
            score = (logs or {}).get(self.monitor)
            if score is None:
                log.warning("%s is not logged; %s is not saved", self.monitor, self.path.name)
                return
            if not score > (-math.inf if self.best is None else self.best):  # NaN never is
                return
            self.best = float(score)
        save_model_atomic(self.model, self.path)


class TimeBudget(keras.callbacks.Callback):
    """Stops training cleanly once the wall-clock budget is spent.

    The run's backup is kept then, so running the same command again
    continues where the budget stopped.
    """

    def __init__(self, minutes, spent_seconds=0.0):
        super().__init__()
        self.seconds = minutes * 60.0
        self.spent_seconds = spent_seconds  # before fit: the mask pretraining
        self.start = None
        self.stopped = False

    def on_train_begin(self, logs=None):
        self.start = time.monotonic() - self.spent_seconds

    def on_epoch_end(self, epoch, logs=None):
        if self.model.stop_training or epoch + 1 >= self.params.get("epochs", float("inf")):
            return  # early stopping (a callback before this one) or the last epoch ended the run
        if time.monotonic() - self.start > self.seconds:
            log.warning(
                "time budget of %.1f min spent after epoch %d: stopping (run the same command again to continue)",
                self.seconds / 60, epoch + 1,
            )
            self.model.stop_training = True
            self.stopped = True


def _strategy(name, cluster_wait_minutes=None):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        tf_config = _tf_config()  # named here, before TensorFlow's own less clear errors
        _log_cluster_wait(tf_config, cluster_wait_minutes)
        with _signals_kept_for_cluster_wait():
            return _wait_for_cluster(tf_config, cluster_wait_minutes)
    return tf.distribute.get_strategy()


# Run in a child process: it ends a worker still waiting at the deadline.
# The parent closes the child's stdin when the wait is over; a parent that
# dies closes it too, so the child never outlives its worker.
_CLUSTER_WAIT_WATCHDOG = """
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl+C ends the worker, and with it this watchdog
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], seconds)[0]:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGKILL)
"""


def _wait_for_cluster(tf_config, minutes):
    """Makes the multi-worker strategy, which blocks until every worker has
    started; with `minutes`, a worker still waiting then is ended.

    TensorFlow waits with no time limit on worker 0, holding the GIL and
    with its own SIGTERM handler in place: nothing in this process can stop
    the wait, so a watchdog process ends it (SIGKILL, after saying why)
    instead of the worker hanging until someone kills it.
    """
    if minutes is None:
        return tf.distribute.MultiWorkerMirroredStrategy()
    task = tf_config["task"]
    message = (
        f"tfface: error: multi_worker: {task['type']} {task['index']} waited {minutes:g} min "
        f"(train.cluster_wait_minutes) for the other workers of TF_CONFIG's cluster ({_other_members(tf_config)}) "
        "to start the same command; they did not, so this worker is stopped (SIGKILL: TensorFlow's wait cannot be "
        "interrupted). Start every worker, check their addresses, or raise train.cluster_wait_minutes (null: no limit)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _CLUSTER_WAIT_WATCHDOG, str(os.getpid()), str(minutes * 60), message],
        stdin=subprocess.PIPE,
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        watchdog.stdin.close()
        watchdog.wait()


@contextlib.contextmanager
def _signals_kept_for_cluster_wait():
    """Ctrl+C ends a worker waiting for its cluster, and SIGTERM works again
    once the wait is over.

    While TensorFlow waits it holds the GIL, so Python's own Ctrl+C handler
    never ran: the default action (end the process; nothing is written yet)
    is put in its place for the wait. TensorFlow's coordination service
    also replaces the SIGTERM handler with a preemption notice of its own
    (which tfface does not read): that is undone after the wait, or a
    multi-worker run ignored SIGTERM (a cluster manager's stop, `timeout`)
    for its whole life.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _other_members(tf_config) -> str:
    task = tf_config["task"]
    others = [
        f"{job} {i} ({address})" for job, i, address in _cluster_members(tf_config)
        if (job, i) != (task["type"], task["index"])
    ]
    return ", ".join(others) or "no other worker"


def _log_cluster_wait(tf_config, minutes=None) -> None:
    """Says what a worker waits for before TensorFlow blocks on it: its own
    "waiting for tasks" lines are below the CLI's log level, so a worker
    whose peer never starts (a wrong address in TF_CONFIG) looked hung."""
    task = tf_config["task"]
    limit = "no time limit" if minutes is None else f"up to {minutes:g} min, train.cluster_wait_minutes"
    log.info(
        "multi_worker: %s %d of %d waiting for %s to start the same command (%s; Ctrl+C or SIGKILL stops a "
        "worker while it waits, SIGTERM does not)",
        task["type"], task["index"], len(_cluster_members(tf_config)), _other_members(tf_config), limit,
    )


def _tf_config() -> dict:
    """The cluster of a multi-worker run, from $TF_CONFIG, checked."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ConfigError(
            "train.strategy 'multi_worker' needs the TF_CONFIG environment variable (JSON with 'cluster' and "
            "'task'), set on every worker"
        )
    try:
        tf_config = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e})") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not any(isinstance(cluster.get(k), list) and cluster[k] for k in ("chief", "worker")):
        raise ConfigError('TF_CONFIG has no "cluster" with a list of "worker" (or "chief") addresses')
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) or not isinstance(task.get("index"), int):
        raise ConfigError('TF_CONFIG has no "task" with a "type" ("worker" or "chief") and an integer "index"')
    addresses = cluster.get(task["type"])
    if not isinstance(addresses, list) or not 0 <= task["index"] < len(addresses):
        raise ConfigError(
            f"TF_CONFIG's task {task['type']} {task['index']} is not in its cluster "
            f"({len(addresses) if isinstance(addresses, list) else 0} {task['type']} address(es))"
        )
    return tf_config


def _chief_scores(strategy, scores, capacity: int) -> list:
    """The chief's `scores` (at most `capacity`) on every worker.

    An all-reduce to which only the chief's replicas contribute, each an
    equal share: workers have no history of their own to read.
    """
    values = np.zeros(capacity + 1, np.float64)
    if _is_chief("multi_worker"):
        scores = list(scores)[-capacity:]
        values[0] = len(scores)
        values[1 : 1 + len(scores)] = scores
    share = tf.constant(values / len(strategy.extended.worker_devices))

    @tf.function
    def all_reduce():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", share))

    shared = strategy.experimental_local_results(all_reduce())[0].numpy()
    return [float(v) for v in shared[1 : 1 + int(round(shared[0]))]]


def _cluster_members(tf_config) -> list:
    """(job, index, address) of the chief and every worker of a TF_CONFIG."""
    cluster = tf_config["cluster"]
    return [(job, i, address) for job in ("chief", "worker") for i, address in enumerate(cluster.get(job) or [])]


def _rank_one_logs(model):
    """Keras 3 averages each step's logs across workers with `axis=0`, which
    fails on scalars (tensorflow/tensorflow#72388); shape (1,) logs average
    to the same scalar. Only for a cluster of several: one worker is not in
    multi-worker mode, its logs are not averaged and would stay (1,), which
    TensorBoard refuses."""
    for name in ("train_step", "test_step"):
        step = getattr(model, name)

        def wrapped(data, step=step):
            return {k: tf.reshape(v, [1]) for k, v in step(data).items()}

        setattr(model, name, wrapped)


def _mixed_precision(mode):
    gpu = bool(tf.config.list_physical_devices("GPU"))
    on = mode == "on" or (mode == "auto" and gpu)
    if on and not gpu:
        log.warning("train.mixed_precision is on without a GPU: float16 on a CPU is slower than float32 ('auto' picks)")
    keras.mixed_precision.set_global_policy("mixed_float16" if on else "float32")
    return bool(on)


def _is_chief(strategy_name: str) -> bool:
    """Only the chief writes the run's files in multi-worker training; any
    other strategy ignores a TF_CONFIG left in the environment."""
    if strategy_name != "multi_worker":
        return True
    tf_config = _tf_config()
    task = tf_config["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and task["index"] == 0 and "chief" not in tf_config["cluster"]


def _worker_folder(out: Path, strategy_name: str) -> Path:
    """Where this process keeps its files: the run folder for the chief, a
    folder of its own inside it for another worker (its resume backup and
    config), so workers given one shared folder never write the same file."""
    if _is_chief(strategy_name):
        return out
    task = _tf_config()["task"]
    return out / f"{task['type']}{task['index']}"


def make_datasets(config: ExperimentConfig, schema, train_sources, val_sources, seed=None, replicas: int = 1):
    """The training and validation streams of a run; `seed` (default
    `train.seed`) orders and augments the training stream. Over several
    `replicas` the validation stream's last batch is padded (see
    `make_dataset(pad_last_batch=)`)."""
    data = config.data
    with_masks = data.with_masks or config.model.type == "mask_guided"
    weights = [s.weight for s in data.sources] if len(train_sources) > 1 else None
    # One choice for both streams: their caches are held together.
    cache = choose_cache(data.cache, train_sources + val_sources, data.image_size)
    cache = cache if cache != "none" else False
    train_ds = make_dataset(
        train_sources,
        schema,
        data.image_size,
        batch_size=data.batch_size,
        training=True,
        weights=weights,
        augment=data.augment,
        with_masks=with_masks,
        cache=cache,
        steps_per_epoch=config.train.steps_per_epoch,
        seed=config.train.seed if seed is None else seed,
    )
    val_ds = None
    if val_sources:
        val_ds = make_dataset(
            val_sources, schema, data.image_size, batch_size=data.batch_size, with_masks=with_masks, cache=cache,
            pad_last_batch=replicas > 1,
        )
    return train_ds, val_ds


def train(config: ExperimentConfig, verbose="auto") -> dict:
    """Trains (or resumes) the run described by `config`; returns a summary."""
    config.validate()
    # Collective ops (multi-worker) must be configured before any other op.
    strategy = _strategy(config.train.strategy, config.train.cluster_wait_minutes)
    out = _worker_folder(Path(config.train.output_dir), config.train.strategy)
    # Open the data before writing anything, so a bad source leaves an
    # existing run folder as it was.
    schema = get_schema(config.data.schema)
    train_sources, val_sources = load_sources(config.data)
    landmark_coverage = check_mask_supervision(config, train_sources)
    check_backbone_weights(config.model)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out} is a file, not a folder")
    busy = (
        f"{out} is being trained by another process (a tfface train still running); wait for it "
        "to end, or choose another train.output_dir (or --output-dir)"
    )
    # Locked by the chief: a second `tfface train` into the folder is refused
    # instead of resuming the running run and mixing its files with it.
    policy = keras.mixed_precision.global_policy()
    try:
        with claimed_folder(out, busy, lock=_is_chief(config.train.strategy)):
            check_resumable(out, config)
            _settle_backup(out / "backup")
            return _train_in(out, config, strategy, schema, train_sources, val_sources, landmark_coverage, verbose)
    finally:
        # train.mixed_precision is the run's: layers the caller makes next get the caller's policy.
        keras.mixed_precision.set_global_policy(policy)


def check_backbone_weights(model_config) -> None:
    """A weights file the backbone would load must exist before the run
    writes anything (the network is built only after the data is prepared)."""
    try:
        local_weights_file(model_config.backbone_weights)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def _train_in(out, config, strategy, schema, train_sources, val_sources, landmark_coverage, verbose) -> dict:
    """`train` once its run folder is claimed and checked."""
    config.save(out / "config.yaml")
    write_atomic(out / SPLIT_FILE, json.dumps(split_record(config.data.val_fraction, config.data.split_seed), indent=2))
    resuming = _is_resuming(out)
    # A resumed run draws its data order, augmentation and dropout from a
    # seed of its own: with the run's seed it would replay those of epoch 0
    # onwards (its weights come from the backup).
    resumed_at = max(1, _backup_epoch(out / "backup" / BACKUP_METADATA) or 0) if resuming else 0
    seed = config.train.seed + resumed_at
    keras.utils.set_random_seed(seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    mixed = _mixed_precision(config.train.mixed_precision)
    train_ds, val_ds = make_datasets(
        config, schema, train_sources, val_sources, seed=seed, replicas=strategy.num_replicas_in_sync
    )
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2

    chief = _is_chief(config.train.strategy)
    pretraining_file = out / "mask_pretraining.json"
    with strategy.scope():
        model = build_model(schema, config.model, training_labels(schema, train_sources))
        # A resumed run's backup holds the pretrained predictor already.
        # A corrupt image stops the pretraining as it stops training: named.
        with naming_undecodable_images(train_sources + val_sources):
            mask_pretraining = None if resuming else pretrain_masks(config, model, train_ds, val_ds, verbose)
        optimizer = _optimizer(config, train_ds)
        model.compile(optimizer=optimizer)
        if config.train.strategy == "multi_worker" and len(_cluster_members(_tf_config())) > 1:
            _rank_one_logs(model)

    pretrained_seconds = mask_pretraining["seconds"] if mask_pretraining else 0.0
    if chief and mask_pretraining:
        write_atomic(pretraining_file, json.dumps(mask_pretraining, indent=2))
    elif resuming and pretraining_file.is_file():
        mask_pretraining = json.loads(pretraining_file.read_text())  # done by the call that was interrupted
    # Two backups: a kill while the newest is written leaves the one before.
    # Kept until the summary is written: a kill after the last epoch then
    # resumes with nothing left to train instead of training again.
    backup = keras.callbacks.BackupAndRestore(str(out / "backup"), double_checkpoint=True, delete_checkpoint=False)
    history_file = out / "history.csv"
    start_epoch = 0
    if resuming and chief and config.train.strategy != "multi_worker":
        with strategy.scope():  # the optimizer's variables are built here
            start_epoch = _restore_backup(backup, model)
            _trim_history(history_file, start_epoch)
    elif resuming and chief:
        # Every worker restores its backup in fit, together; the chief's
        # history still loses the rows of epochs its backup had not finished.
        backed_up = _backup_epoch(out / "backup" / BACKUP_METADATA)
        if backed_up is not None:
            _trim_history(history_file, backed_up)
    # BackupAndRestore brings back weights, optimizer and epoch only; the
    # best score so far and early stopping's count come from the history,
    # so a resumed run neither overwrites a better model.keras nor waits
    # its whole patience again.
    earlier = _monitored_history(history_file) if resuming else []
    best_model = out / "model.keras"
    # A model.keras cut short (by a tfface before 0.2.6, which saved it in
    # place) must be rewritten, whatever its score.
    best_so_far = max(earlier) if earlier and zipfile.is_zipfile(best_model) else None
    callbacks = []
    if chief:
        last_model = out / "last.keras"
        for saved in (last_model, best_model):
            discard_leftovers(saved)  # the partial saves of a killed run
        # Before the backup, so every epoch the backup holds is logged and saved.
        callbacks += [
            keras.callbacks.CSVLogger(str(history_file), append=resuming),
            keras.callbacks.TensorBoard(str(out / "logs"), update_freq="epoch"),
            AtomicModelCheckpoint(last_model),
        ]
        if val_ds is not None:
            callbacks.append(AtomicModelCheckpoint(best_model, monitor=MONITOR, initial_value_threshold=best_so_far))
    callbacks += [BackupSpaceCheck(out / "backup"), backup]
    early_stopping = budget = None
    epochs = config.train.epochs
    if config.train.early_stopping_patience > 0 and val_ds is not None:
        if config.train.strategy == "multi_worker":
            # Only the chief keeps the history, and all workers must stop at
            # the same epoch: every worker replays the chief's scores.
            earlier = _chief_scores(strategy, earlier, capacity=config.train.epochs)
        early_stopping = ResumedEarlyStopping(earlier, patience=config.train.early_stopping_patience)
        callbacks.append(early_stopping)
        if start_epoch and early_stopping.patience_spent():
            epochs = start_epoch  # it had stopped; the kill came before the summary
    if config.train.time_budget_minutes:
        budget = TimeBudget(config.train.time_budget_minutes, spent_seconds=pretrained_seconds)
        callbacks.append(budget)

    start = time.monotonic()
    with naming_undecodable_images(train_sources + val_sources), closing_files_of_a_failed_write():
        history = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the pipeline shuffles
        )
    seconds = time.monotonic() - start
    if chief and val_ds is None:
        save_model_atomic(model, out / "model.keras")
    summary = {
        "name": config.name,
        "tfface_version": tfface.__version__,
        "output_dir": str(out),
        "model_path": str(out / "model.keras"),
        # All epochs of the run, also when this call resumed or continued it
        # (`history` and `train_seconds` cover this call only).
        "epochs_run": int(getattr(model, "_initial_epoch", None) or 0) + len(history.history.get("loss", [])),
        "stopped_by": (
            "time_budget" if budget is not None and budget.stopped
            else "early_stopping" if early_stopping is not None and (early_stopping.stopped_epoch > 0 or epochs < config.train.epochs)
            else "epochs"
        ),
        "train_seconds": round(seconds, 1),
        "train_examples": int(sum(len(s) for s in train_sources)),
        # What each configured source was read as: the model card takes the
        # licence terms from the format, not from the folder's name.
        "sources": [
            {
                "path": str(cfg.path), "name": source.name, "format": source.format, "train_examples": len(source),
                "problems": list(source.problems),  # what reading the source skipped
            }
            for cfg, source in zip(config.data.sources, train_sources)
        ],
        "val_examples": int(sum(len(s) for s in val_sources)),
        "mixed_precision": mixed,
        "mask_pretraining": mask_pretraining,
        # Training images per source with landmarks (mask supervision).
        "landmark_coverage": landmark_coverage,
        "parameters": int(model.count_params()),
        "history": _history_json(history),
        "config": dataclasses.asdict(config),
    }
    if chief:
        write_atomic(out / "train_summary.json", json.dumps(summary, indent=2, default=str))
    if not (budget is not None and budget.stopped):
        shutil.rmtree(out / "backup", ignore_errors=True)  # the run is over: the summary says so
    return summary


def pretrain_masks(config: ExperimentConfig, model, train_ds, val_ds, verbose, callbacks=()):
    """MGMTN's stage 1 when `train.mask_pretrain_epochs` asks for it: the mask
    predictor alone on the landmark masks, then frozen unless
    `model.mask_trainable`. Returns its epochs, time and history, or None."""
    epochs = config.train.mask_pretrain_epochs
    if not epochs:
        return None
    from tfface.models.mask_predictor import pretrain_mask_predictor

    log.info("pretraining the mask predictor for %d epoch(s) on the landmark masks", epochs)
    start = time.monotonic()
    history = pretrain_mask_predictor(
        model,
        train_ds,
        epochs=epochs,
        learning_rate=config.train.learning_rate,
        validation_data=val_ds,
        freeze=not config.model.mask_trainable,
        verbose=verbose,
        callbacks=list(callbacks),
    )
    return {
        "epochs": epochs,
        "seconds": round(time.monotonic() - start, 1),
        "frozen": not config.model.mask_trainable,
        "history": _history_json(history),
    }


def _history_json(history) -> dict:
    """Keras history as JSON values: null for NaN (a task no example labels)."""
    return {k: [float(v) if np.isfinite(v) else None for v in vals] for k, vals in history.history.items()}


def _optimizer(config, train_ds):
    train = config.train
    return make_optimizer(train, train.steps_per_epoch or int(train_ds.cardinality().numpy()))
