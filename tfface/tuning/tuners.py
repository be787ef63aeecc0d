"""KerasTuner's tuners, with what tfface adds to them.

Left as they are, KerasTuner's tuners leak every trial's graph, rewrite
their state files in place (a kill mid-write lost the search), crash when
the disk fills during a checkpoint and know no time budget. The tuner
classes here and their helpers fix that while keeping KerasTuner's own
search loop.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from tfface.atomic_files import estimated_weights_file_bytes
from tfface.atomic_files import require_free_space
from tfface.atomic_files import write_atomic
from tfface.tuning.config import TuningConfig
from tfface.tuning.config import TuningError
from tfface.tuning.distributed import distributed_role
from tfface.tuning.distributed import serve_oracle
from tfface.tuning.distributed import stop_oracle

log = logging.getLogger(__name__)


def _stop_at_deadline_callback(deadline, on_stop: Optional[Callable] = None):
    """A callback ending the running trial when the search's time budget is
    spent, calling `on_stop()` then (KerasTuner runs deep copies of a
    trial's callbacks; a function survives the copy as itself)."""
    import keras

    class StopAtDeadline(keras.callbacks.Callback):
        # The hypermodel passes it to a trial's mask pretraining as well.
        applies_to_pretraining = True

        def on_train_batch_end(self, batch, logs=None):
            if time.time() > deadline:
                self.model.stop_training = True
                if on_stop is not None:
                    on_stop()

    return StopAtDeadline()


CUT_TRIALS_FILE = "cut_by_budget.json"


def cut_trials(project_dir: Path) -> dict:
    """{trial id: epochs it trained} of the trials the time budget cut short."""
    path = Path(project_dir) / CUT_TRIALS_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        raise TuningError(f"{path} is not valid JSON; remove {Path(project_dir)} to start the search over") from None


def _gradient_registry() -> dict:
    """TensorFlow's global registry of gradient functions ({} if it moved)."""
    try:
        from tensorflow.python.framework import ops

        return ops._gradient_registry._registry
    except (ImportError, AttributeError):  # pragma: no cover - other TF versions
        return {}


def release_memory(gradients_before=None):
    """Frees what a finished trial left behind.

    Besides the Keras session: each traced train step registers a
    `tf.custom_gradient` function (from `ReplicaContext.all_reduce`) in
    TensorFlow's global gradient registry under a fresh name and never
    removes it; its closure holds the whole traced graph, so every trial
    would leak ~70 MB. The trial's own entries are dropped here; nothing
    traces those graphs again.
    """
    import keras

    if gradients_before is not None:
        registry = _gradient_registry()
        for name in set(registry) - gradients_before:
            if name.startswith("CustomGradient-"):
                del registry[name]
    keras.backend.clear_session()
    gc.collect()


class _FaceTunerMixin:
    """What tfface adds to KerasTuner's tuners.

    - the search space is declared from the YAML file, without building
      throw-away models to discover it;
    - every trial's model and traced graphs are released when the trial
      ends (see `release_memory`), and the results returned to KerasTuner
      hold no reference to the model;
    - a time budget stops the search (and the running trial) when spent;
    - the chief serves the oracle with a short poll and stops cleanly.
    """

    def __init__(self, *args, deadline=None, on_trial_end_hook=None, **kwargs):
        self.deadline = deadline
        self.on_trial_end_hook = on_trial_end_hook
        self.trials_run = []
        self.stopped_by_budget = False
        super().__init__(*args, **kwargs)

    def _populate_initial_space(self):
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def search(self, *fit_args, **fit_kwargs):
        if distributed_role() == "chief":
            self.oracle.verbose = fit_kwargs.get("verbose", 1)
            self.save()
            self.stopped_by_budget = serve_oracle(self.oracle, self.deadline)
            return
        super().search(*fit_args, **fit_kwargs)

    def reload(self):
        super().reload()
        if not self._is_worker():
            _forget_unrecorded_trials(self.oracle)

    def on_search_begin(self):
        # Saved at once, so a search killed in its first trial reloads the
        # oracle state instead of starting over.
        self.save()
        super().on_search_begin()

    def pre_create_trial(self):
        if self.deadline and time.time() > self.deadline and distributed_role() == "local":
            stop_oracle(self.oracle)
            self.stopped_by_budget = True
        super().pre_create_trial()

    def run_trial(self, trial, *args, **kwargs):
        import keras

        stopped = []
        # Runs before KerasTuner's own checkpoint callback, which it appends.
        space_check = _checkpoint_space_check(self._get_checkpoint_fname(trial.trial_id), trial.trial_id)
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [space_check]
        if self.deadline:
            stop = _stop_at_deadline_callback(self.deadline, on_stop=lambda: stopped.append(True))
            kwargs["callbacks"] = kwargs["callbacks"] + [stop]
        histories = super().run_trial(trial, *args, **kwargs)
        if not isinstance(histories, list):
            histories = [histories]
        if stopped:
            # Scored on fewer epochs than the others: never the best trial.
            epochs = max((len(h.epoch) for h in histories if isinstance(h, keras.callbacks.History)), default=0)
            cut = cut_trials(self.project_dir)
            cut[str(trial.trial_id)] = epochs
            _write_json_atomic(Path(self.project_dir) / CUT_TRIALS_FILE, cut)
        detached = []
        for history in histories:
            if isinstance(history, keras.callbacks.History):
                # A History holds its model: keep only the numbers.
                copy = keras.callbacks.History()
                copy.history, copy.epoch = dict(history.history), list(history.epoch)
                history = copy
            detached.append(history)
        return detached

    def on_trial_begin(self, trial):
        self._gradients_before = set(_gradient_registry())
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.trials_run.append(trial.trial_id)
        release_memory(getattr(self, "_gradients_before", None))
        if self.on_trial_end_hook is not None:
            self.on_trial_end_hook(trial)


def _checkpoint_space_check(checkpoint, trial_id):
    """A callback that stops the search, with one error naming the trial's
    folder, when the disk cannot hold the trial's checkpoint: KerasTuner
    writes it in place with HDF5, which crashed the process (segfault) when
    the disk filled in the middle of it. A FatalError, so that KerasTuner
    does not mark the trial failed and go on to fail the next ones."""
    import keras
    import keras_tuner

    class CheckpointSpaceCheck(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            path = Path(checkpoint)
            try:
                require_free_space(
                    path.parent, estimated_weights_file_bytes(self.model.weights),
                    f"trial {trial_id}'s checkpoint", freed=path.stat().st_size if path.is_file() else 0,
                    hint="free some space and run the same command again (the search resumes with this trial)",
                )
            except OSError as e:
                raise keras_tuner.errors.FatalError(str(e)) from None

    return CheckpointSpaceCheck()


def _tuner_classes():
    import keras_tuner

    class FaceRandomSearch(_FaceTunerMixin, keras_tuner.RandomSearch):
        pass

    class FaceHyperband(_FaceTunerMixin, keras_tuner.Hyperband):
        pass

    class FaceBayesianOptimization(_FaceTunerMixin, keras_tuner.BayesianOptimization):
        pass

    return {"random": FaceRandomSearch, "hyperband": FaceHyperband, "bayesian": FaceBayesianOptimization}


def _write_json_atomic(path, obj, indent=None) -> str:
    text = json.dumps(obj, indent=indent)
    write_atomic(path, text)
    return text


def _make_keras_tuner_state_writes_atomic() -> None:
    """KerasTuner 1.4 rewrites oracle.json, tuner0.json and trial.json in
    place (truncate, then write). A search killed during such a write left
    an empty file that it could not reload ("Expecting value") - the search
    was lost. Its one writer, `keras_tuner.src.utils.save_json`, is looked up
    at each call, so replacing it makes every state file atomic (local
    paths; remote ones are written as before)."""
    from keras_tuner.src import utils as kt_utils

    if getattr(kt_utils.save_json, "atomic", False):
        return
    original = kt_utils.save_json

    def save_json(path, obj):
        if "://" in str(path):
            return original(path, obj)
        return _write_json_atomic(path, obj)

    save_json.atomic = True
    kt_utils.save_json = save_json


def _forget_unrecorded_trials(oracle) -> None:
    """KerasTuner writes a new trial's trial.json, then oracle.json. A kill
    between the two left a RUNNING trial the reloaded oracle had never
    recorded: it was not rerun, yet counted toward max_trials (a resumed
    search ended with it "not completed"). Such a trial has trained nothing
    (oracle.json is written right after), so it is dropped and its id is
    drawn again; one whose folder holds more is retried instead."""
    import keras_tuner

    retried = set(oracle._retry_queue) | {t.trial_id for t in oracle.ongoing_trials.values()}
    for trial_id, trial in list(oracle.trials.items()):
        if trial.status != keras_tuner.engine.trial.TrialStatus.RUNNING or trial_id in retried:
            continue
        folder = Path(oracle._project_dir) / f"trial_{trial_id}"
        if sorted(p.name for p in folder.iterdir()) == ["trial.json"]:
            log.warning("trial %s was created but never recorded by a search that was killed: drawing it again", trial_id)
            del oracle.trials[trial_id]
            (folder / "trial.json").unlink()
            folder.rmdir()
        else:
            oracle._retry_queue.append(trial_id)


def _check_state_files(project_dir: Path) -> None:
    """A state file cut short (by a kill before writes were atomic, or by a
    full disk) is reported by name instead of as a JSON parse error deep
    in KerasTuner."""
    for path in [project_dir / "oracle.json", *sorted(project_dir.glob("tuner*.json")),
                 *sorted(project_dir.glob("trial_*/trial.json"))]:
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text())
        except ValueError:
            raise TuningError(
                f"{path} is empty or cut short (not valid JSON), so the search cannot resume; "
                f"remove {project_dir} to start it over"
            ) from None


def make_tuner(tuning: TuningConfig, hypermodel, deadline=None, on_trial_end_hook=None):
    """The KerasTuner tuner named by `tuning.tuner`, over `tuning.project_dir`."""
    from tfface.tuning.hypermodels import objective

    _make_keras_tuner_state_writes_atomic()
    _check_state_files(tuning.project_dir)

    common = dict(
        hypermodel=hypermodel,
        objective=objective(),
        seed=tuning.seed,
        executions_per_trial=tuning.executions_per_trial,
        directory=str(tuning.project_dir.parent),
        project_name=tuning.project,
        overwrite=False,
        deadline=deadline,
        on_trial_end_hook=on_trial_end_hook,
    )
    cls = _tuner_classes()[tuning.tuner]
    if tuning.tuner == "hyperband":
        return cls(max_epochs=tuning.max_epochs, factor=tuning.factor,
                   hyperband_iterations=tuning.hyperband_iterations, **common)
    return cls(max_trials=tuning.max_trials, **common)
