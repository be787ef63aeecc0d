"""The Keras callbacks of a long training run.

Apart from the trainer so that each reads, and is tested, on its own: the
trainer only chooses which ones a run gets.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import keras

from tfface.atomic_files import estimated_weights_file_bytes
from tfface.atomic_files import require_free_space
from tfface.atomic_files import save_model_atomic
from tfface.training.resume import BACKUP_WEIGHTS
from tfface.training.resume import MONITOR

log = logging.getLogger(__name__)


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
