"""`tfface tune`: a KerasTuner search over gates, loss weights and training.

A tuning config (YAML, see tuning/*.yaml) names the project, the tuner
(random | hyperband | bayesian), the trial budget, the base experiment
(inline or a path) and the search-space file. Those paths are relative to
the tuning config's folder (the experiment's own paths, as for `tfface
train`, to the working directory); results go to `<directory>/<project>/` (by
default beside the tuning config, so tuning/<project>/):

- KerasTuner's own files (oracle.json, tuner0.json, trial_*/), which make
  the same command resume a killed search without rerunning a completed
  trial (`overwrite=False`);
- `best_config.yaml`: the base experiment with the best values set, ready
  for `tfface train --config`;
- `summary.md` (every trial: id, status, objective, values),
  `objective.png` (objective against trial) and `results.json`.

The data is read once and reused by every trial; each trial's model is
released (`keras.backend.clear_session()` + `gc.collect()`) when it ends.
A search whose every trial failed raises `TuningError` with the first
trial's error instead of "completing".

Distributed search uses KerasTuner's chief/worker mode unchanged: run the
same command with KERASTUNER_TUNER_ID=chief (serves the oracle, trains
nothing, writes the results) and with KERASTUNER_TUNER_ID=tuner0, tuner1,
... (workers), all with KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tfface.atomic_files import atomic_path
from tfface.atomic_files import claimed_folder
from tfface.atomic_files import estimated_weights_file_bytes
from tfface.atomic_files import require_free_space
from tfface.atomic_files import write_atomic
from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.config import read_structured_file
from tfface.data.splits import split_method_problem
from tfface.data.splits import split_record
from tfface.tuning.search_space import SearchSpace

log = logging.getLogger(__name__)

TUNERS = ("random", "hyperband", "bayesian")
OBJECTIVE = "val_mean_balanced_accuracy"
_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TuningError(RuntimeError):
    """A search that produced no usable trial (every trial failed)."""


# --- the tuning config ----------------------------------------------------------


@dataclasses.dataclass
class TuningConfig:
    """One search: what to vary, how many trials, where results go."""

    project: str
    experiment: Any  # inline ExperimentConfig mapping, or a path to one
    search_space: str  # path to a search-space YAML file
    tuner: str = "random"
    max_trials: int = 10  # random, bayesian
    executions_per_trial: int = 1
    epochs: int = 2  # per trial (random, bayesian)
    max_epochs: int = 4  # hyperband: most epochs a trial gets
    factor: int = 3  # hyperband
    hyperband_iterations: int = 1  # hyperband
    seed: int = 0
    time_budget_minutes: Optional[float] = None  # whole search, per invocation
    chief_wait_minutes: float = 10.0  # distributed: how long a worker waits for the chief
    directory: str = "."  # results: <directory>/<project>/
    source: Optional[Path] = dataclasses.field(default=None, repr=False)

    @classmethod
    def load(cls, path) -> "TuningConfig":
        path = Path(path)
        raw = read_structured_file(path, "tuning config")
        try:
            return cls.from_dict(raw, source=path)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw, source=None) -> "TuningConfig":
        if not isinstance(raw, dict):
            raise ConfigError("a tuning config must be a mapping")
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown tuning config key(s) {unknown}; known: {sorted(known)}")
        for key in ("project", "experiment", "search_space"):
            if raw.get(key) in (None, ""):
                raise ConfigError(f"tuning config needs '{key}'")
        config = cls(**raw, source=Path(source) if source else None)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.project, str) or not _PROJECT_NAME.match(self.project):
            raise ConfigError(f"project must be a plain name (letters, digits, _ . -), got {self.project!r}")
        if self.tuner not in TUNERS:
            raise ConfigError(f"tuner must be one of {list(TUNERS)}, got {self.tuner!r}")
        for key, low in (("max_trials", 1), ("executions_per_trial", 1), ("epochs", 1), ("max_epochs", 1),
                         ("factor", 2), ("hyperband_iterations", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in 0..2**32-1, got {self.seed!r}")
        for key in ("time_budget_minutes", "chief_wait_minutes"):
            value = getattr(self, key)
            if value is None and key == "time_budget_minutes":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key} must be a number > 0, got {value!r}")
        if not isinstance(self.experiment, (dict, str)):
            raise ConfigError("experiment must be a mapping (an inline experiment config) or a path to one")
        for key in ("search_space", "directory"):
            if not isinstance(getattr(self, key), (str, os.PathLike)) or not str(getattr(self, key)):
                raise ConfigError(f"{key} must be a path, got {getattr(self, key)!r}")

    # --- what it points at ------------------------------------------------------
    def _path(self, value) -> Path:
        path = Path(value)
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path

    @property
    def project_dir(self) -> Path:
        return self._path(self.directory) / self.project

    def load_experiment(self) -> ExperimentConfig:
        if isinstance(self.experiment, dict):
            try:
                return ExperimentConfig.from_dict(self.experiment)
            except ConfigError as e:
                raise ConfigError(f"{self.source or 'tuning config'}: experiment: {e}") from None
        return ExperimentConfig.load(self._path(self.experiment))

    def load_search_space(self) -> SearchSpace:
        return SearchSpace.load(self._path(self.search_space))

    @property
    def trial_epochs(self) -> int:
        return self.max_epochs if self.tuner == "hyperband" else self.epochs


@dataclasses.dataclass
class SearchData:
    """The datasets every trial reuses (read once per search)."""

    train: Any
    val: Any
    steps_per_epoch: int
    # Task name -> training labels, for models that start from label
    # statistics (model.correlation_init: label_correlation).
    train_labels: Optional[dict] = None
    # Which images each source gave to training and validation
    # (`data_record`); search.json keeps it so a resume can tell.
    data_record: Optional[dict] = None


def load_search_data(config: ExperimentConfig) -> SearchData:
    """Reads and splits the sources and builds the fused train/val datasets."""
    from tfface.schema import get_schema
    from tfface.training.trainer import check_mask_supervision
    from tfface.training.trainer import load_sources
    from tfface.training.trainer import make_datasets
    from tfface.training.trainer import training_labels

    schema = get_schema(config.data.schema)
    train_sources, val_sources = load_sources(config.data)
    check_mask_supervision(config, train_sources)
    train_ds, val_ds = make_datasets(config, schema, train_sources, val_sources)
    steps = int(train_ds.cardinality().numpy())
    if steps < 1:
        steps = config.train.steps_per_epoch or 1
    return SearchData(
        train_ds, val_ds, steps, training_labels(schema, train_sources),
        data_record=data_record(config, train_sources, val_sources),
    )


# What image ids `data_record` digests, recorded beside the digests.
IMAGE_IDS = (
    "blake2b-16 of the sorted image ids, one per line: a file's path under its source's images folder, "
    "or the blake2b-16 of the pixels of an image held in memory"
)


def image_ids(source) -> list[str]:
    """An id per image of a `FaceSource` (split or not), without decoding
    any: a file's path under the source's images folder (as its label
    files name it), or a digest of the pixels of an image held in memory."""
    import numpy as np

    if source.image_paths is None:
        return [hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()
                for image in source.images]
    if source.root:
        from tfface.data.sources import source_image_ids

        return source_image_ids(source)
    return [os.path.basename(str(p)) for p in source.image_paths]


def _ids_digest(ids) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for image_id in sorted(ids):
        digest.update(image_id.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# What `data_record` digests as a side's labels, recorded beside the digests.
LABELS = (
    "blake2b-16 of each label column (sorted by name) as float64 values, rows in the order of the "
    "sorted image ids, then the identities the same way"
)


def _labels_digest(source, ids) -> str:
    """A digest of a side's label values, row order fixed by its image `ids`,
    so a label file rewritten with other values (same rows) is noticed."""
    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    if source is None or len(source) == 0:
        return digest.hexdigest()
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    named = sorted(source.columns.items())
    if source.identities is not None:
        named.append(("\0identities", source.identities))
    for name, values in named:
        digest.update(name.encode("utf-8") + b"\n")
        digest.update(np.asarray(values, dtype="<f8")[order].tobytes())
    return digest.hexdigest()


def data_record(config: ExperimentConfig, train_sources, val_sources) -> dict:
    """What a search trains and validates on, per source in the config's
    order: its path as the config gives it, its training and validation
    image counts, and digests of each side's sorted image ids and labels."""
    sources = []
    for i, source_config in enumerate(config.data.sources):
        val = val_sources[i] if i < len(val_sources) else None
        # Ids once per side: for images held in memory each is a hash of its pixels.
        train_ids, val_ids = image_ids(train_sources[i]), [] if val is None else image_ids(val)
        sources.append({
            "source": str(source_config.path),
            "train_images": len(train_sources[i]),
            "val_images": 0 if val is None else len(val),
            "train_ids": _ids_digest(train_ids),
            "val_ids": _ids_digest(val_ids),
            "train_labels": _labels_digest(train_sources[i], train_ids),
            "val_labels": _labels_digest(val, val_ids),
        })
    return {"image_ids": IMAGE_IDS, "labels": LABELS, "sources": sources}


def read_data_record(config: ExperimentConfig) -> dict:
    """`data_record` of the base experiment's sources, opened and split as
    a trial's data is, but without building any dataset (the chief trains
    nothing)."""
    from tfface.training.trainer import load_sources

    train_sources, val_sources = load_sources(config.data)
    return data_record(config, train_sources, val_sources)


def prepare(tuning_config_path):
    """Loads and checks everything a search needs, before any data or trial:
    (tuning config, base experiment, checked search space).

    `tuning_config_path`: a YAML file, or a `TuningConfig` or its mapping
    (their relative paths are then taken from the working directory)."""
    if isinstance(tuning_config_path, TuningConfig):
        tuning = tuning_config_path
    elif isinstance(tuning_config_path, dict):
        tuning = TuningConfig.from_dict(tuning_config_path)
    elif isinstance(tuning_config_path, (str, os.PathLike)):
        tuning = TuningConfig.load(tuning_config_path)
    else:
        raise TypeError(
            "a search takes a tuning config file, a TuningConfig or a mapping of its fields, "
            f"got {type(tuning_config_path).__name__}"
        )
    base = tuning.load_experiment()
    if base.data.val_fraction <= 0:
        raise ConfigError(
            f"{tuning.source or 'tuning config'}: experiment data.val_fraction is 0; the objective "
            f"{OBJECTIVE} needs validation data"
        )
    space = tuning.load_search_space().check(base)
    space.check_trial_schedule(base, tuning.trial_epochs)
    _distributed_role()  # checks the KerasTuner environment variables
    return tuning, base, space


# --- tuners -----------------------------------------------------------------------


def _distributed_role() -> str:
    """"local", or KerasTuner's "chief" / "worker" from its environment."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "local"
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(var):
            raise ConfigError(f"KERASTUNER_ORACLE_IP is set but {var} is not (distributed search needs both)")
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"KERASTUNER_ORACLE_PORT must be a port number (1-65535), got {port!r}")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def _wait_for_chief(minutes: float) -> None:
    """Waits for the chief's oracle to accept connections, for at most
    `minutes`. KerasTuner's own client would wait an hour on its first call
    and then fail with a bare DEADLINE_EXCEEDED traceback."""
    import grpc

    tuner_id = os.environ["KERASTUNER_TUNER_ID"]
    target = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    log.info("worker %s: waiting up to %g min for the chief's oracle at %s", tuner_id, minutes, target)
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=minutes * 60.0)
    except grpc.FutureTimeoutError:
        raise TuningError(
            f"worker {tuner_id}: no chief answered at {target} within {minutes:g} min (chief_wait_minutes); "
            f"start the chief (KERASTUNER_TUNER_ID=chief, same config) or check "
            f"KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT"
        ) from None
    finally:
        channel.close()


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


def _cut_trials(project_dir: Path) -> dict:
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


def _release_memory(gradients_before=None):
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
      ends (see `_release_memory`), and the results returned to KerasTuner
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
        if _distributed_role() == "chief":
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
        if self.deadline and time.time() > self.deadline and _distributed_role() == "local":
            _stop_oracle(self.oracle)
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
            cut = _cut_trials(self.project_dir)
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
        _release_memory(getattr(self, "_gradients_before", None))
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


def _stop_oracle(oracle):
    """No new trials: the oracle answers STOPPED from now on."""
    done = max(1, len(oracle.trials))
    if not oracle.max_trials or oracle.max_trials > done:
        log.warning("time budget spent: no new trials after %d", len(oracle.trials))
        oracle.max_trials = done


def serve_oracle(oracle, deadline=None, poll_seconds=0.5) -> bool:
    """The chief: serves `oracle` to the workers over gRPC until they are done.

    KerasTuner's own servicer and protocol (`oracle_chief`), with a short
    poll (KerasTuner sleeps 20 s between checks), the time budget, and a
    clean server stop. Returns whether the budget stopped the search.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # newer grpc raises instead of returning 0
        bound = 0
    if bound == 0:
        raise ConfigError(f"the chief cannot listen on {address} (port in use?)")
    server.start()
    log.info("chief: oracle served on %s", address)
    stopped_by_budget = False
    try:
        while True:
            time.sleep(poll_seconds)
            if deadline and time.time() > deadline and not stopped_by_budget:
                _stop_oracle(oracle)
                stopped_by_budget = True
            if servicer.stop_triggered and oracle_chief.exit_chief(oracle):
                break
    finally:
        server.stop(grace=2).wait()
    return stopped_by_budget


# --- the search ---------------------------------------------------------------------


def run_search(
    tuning_config_path,
    *,
    data: Optional[SearchData] = None,
    verbose="auto",
    on_trial_end: Optional[Callable] = None,
) -> dict:
    """Runs (or resumes) the search of a tuning config; returns its summary.

    Args:
        tuning_config_path: the tuning config YAML (or a `TuningConfig`, or
            a mapping of its fields).
        data: datasets already loaded for the base experiment (read from its
            sources when None).
        verbose: Keras/KerasTuner verbosity; "auto" is 1 on a terminal, 2
            otherwise.
        on_trial_end: called with each KerasTuner `Trial` this process ends,
            after its memory is released (used by the memory benchmark).

    Returns a dict: role ("local", "chief" or "worker"), project_dir,
    trials_run (ids this process ran), and except on workers: trials
    (records), best (record), best_config, summary, plot, results paths.
    """
    tuning, base, space = prepare(tuning_config_path)
    role = _distributed_role()
    if role == "worker":  # writes its trials into the chief's search
        return _search(tuning, base, space, role, data, verbose, on_trial_end)
    busy = (
        f"{tuning.project_dir} is being searched by another process (a tfface tune still running); wait "
        "for it to end, or give this search another project name"
    )
    # Locked: a second search into the project would run the same trials.
    with claimed_folder(tuning.project_dir, busy):
        return _search(tuning, base, space, role, data, verbose, on_trial_end)


def _search(tuning, base, space, role, data, verbose, on_trial_end) -> dict:
    """`run_search` once its project folder is claimed (except on a worker)."""
    import keras
    import keras_tuner

    from tfface.tuning.hypermodels import hypermodel_for

    project_dir = tuning.project_dir
    if role != "worker":  # before any data is read
        _check_same_search(project_dir, tuning, base, space)
    start = time.time()
    deadline = start + tuning.time_budget_minutes * 60.0 if tuning.time_budget_minutes else None
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2

    steps = 1
    if role != "chief":  # the chief trains nothing
        if data is None:
            data = load_search_data(base)
        steps = data.steps_per_epoch
    record = None
    if role != "worker":  # before any trial runs and search.json is rewritten
        record = getattr(data, "data_record", None) or read_data_record(base)
        _check_same_data(project_dir, record)
    keras.utils.set_random_seed(tuning.seed)
    hypermodel = hypermodel_for(
        base,
        space,
        steps_per_epoch=steps,
        schedule_epochs=tuning.trial_epochs,
        train_labels=data.train_labels if data is not None else None,
        builds_models=role != "chief",
    )
    data_compared = None
    if role == "worker":
        _wait_for_chief(tuning.chief_wait_minutes)
        data_compared = _check_worker_data(project_dir, getattr(data, "data_record", None))
    tuner = make_tuner(tuning, hypermodel, deadline=deadline, on_trial_end_hook=on_trial_end)
    if role != "worker":
        _write_meta(project_dir, tuning, base, space, record)
    fit_args = () if data is None else (data.train,)
    # The training stream is shuffled by the pipeline already.
    fit_kwargs = dict(epochs=tuning.epochs, verbose=verbose, shuffle=False)
    if data is not None:
        fit_kwargs["validation_data"] = data.val
    aborted = None
    try:
        tuner.search(*fit_args, **fit_kwargs)
    except keras_tuner.errors.FatalError as e:  # a checkpoint the disk cannot hold
        raise TuningError(f"search {tuning.project} stopped: {e}") from None
    except RuntimeError as e:
        # KerasTuner gives up after a few failed trials in a row; report
        # them like any failed trial instead of with a traceback.
        if "consecutive failures" not in str(e) or role == "worker":
            raise
        aborted = str(e)
    _release_memory()

    summary = {
        "project": tuning.project,
        "project_dir": str(project_dir),
        "role": role,
        "tuner_id": tuner.tuner_id,
        "trials_run": list(tuner.trials_run),
        "stopped_by_budget": tuner.stopped_by_budget,
        "search_seconds": round(time.time() - start, 1),
    }
    if role == "worker":
        summary["data_compared_with_chief"] = data_compared
        return summary
    records = trial_records(tuner.oracle, space, _cut_trials(project_dir))
    try:
        summary.update(write_results(project_dir, tuning, base, space, records, tuner.stopped_by_budget))
    except TuningError as e:
        if aborted:
            raise TuningError(f"{e}\n(KerasTuner stopped the search: {aborted})") from None
        raise
    if aborted:
        failed = [r for r in records if r["status"] != "COMPLETED"]
        first = failed[0] if failed else {"trial_id": "?", "message": None}
        raise TuningError(
            f"search {tuning.project} stopped: {aborted} ({len(failed)} of {len(records)} trials failed; see "
            f"{summary['summary']}); first error (trial {first['trial_id']}):\n{first['message'] or '(no message)'}"
        )
    return summary


def _previous_meta(project_dir: Path) -> Optional[dict]:
    """The search.json of an earlier run in `project_dir`, or None."""
    meta = project_dir / "search.json"
    if not meta.is_file():
        return None
    try:
        previous = json.loads(meta.read_text())
    except ValueError:
        previous = None
    if not isinstance(previous, dict):
        raise TuningError(f"{meta} is not valid JSON; remove {project_dir} to start the search over") from None
    return previous


def _check_same_search(project_dir: Path, tuning: TuningConfig, base: ExperimentConfig, space: SearchSpace) -> None:
    """Refuses to resume a search as another tuner, over another space or
    base experiment: KerasTuner would keep sampling the space stored in its
    oracle and silently mix trials of two searches. (The data itself is
    checked by `_check_same_data`, once it is read.)"""
    meta = project_dir / "search.json"
    previous = _previous_meta(project_dir)
    if previous is None:
        return
    problem = split_method_problem(previous.get("split"), f"the search in {project_dir}")
    if problem:
        raise ConfigError(
            f"{problem}; resuming would rank trials validated on different images: use another project "
            f"name or remove {project_dir}"
        )
    if previous.get("tuner") and previous["tuner"] != tuning.tuner:
        raise ConfigError(
            f"{project_dir} holds a {previous['tuner']} search; resuming it as {tuning.tuner} cannot work: "
            f"use another project name or remove {project_dir}"
        )
    for key, now, what in (
        ("space", _space_record(space), "search space"),
        ("experiment", _experiment_record(base), "base experiment"),
        ("trial_budget", _trial_budget_record(tuning), "trial budget (epochs per trial, Hyperband settings, seed)"),
    ):
        if key in previous and previous[key] != now:
            raise ConfigError(
                f"{project_dir} holds a search over another {what} ({meta} records the one it ran); "
                f"resuming would mix trials of two searches: use another project name or remove {project_dir}"
            )


def _data_changes(before: dict, now: dict, then_word: str = "before", now_word: str = "now") -> list[str]:
    """What differs between two `data_record`s, in words."""
    old = before.get("sources") if isinstance(before, dict) else None
    if not isinstance(old, list) or not all(isinstance(s, dict) for s in old):
        return ["the recorded data cannot be read"]
    new = now["sources"]
    names_before, names_now = [s.get("source") for s in old], [s["source"] for s in new]
    if names_before != names_now:
        return [f"sources {names_before} {then_word}, {names_now} {now_word}"]
    changes = []
    for was, is_ in zip(old, new):
        for side, what in (("val", "validation"), ("train", "training")):
            count_before, count_now = was.get(f"{side}_images"), is_[f"{side}_images"]
            if count_before != count_now:
                changes.append(
                    f"{what} images of source {is_['source']}: {count_before} {then_word}, {count_now} {now_word}"
                )
            elif was.get(f"{side}_ids") != is_[f"{side}_ids"]:
                changes.append(
                    f"{what} images of source {is_['source']}: {count_now} {then_word} and {now_word}, "
                    "but not the same images"
                )
            elif was.get(f"{side}_labels") not in (None, is_.get(f"{side}_labels")):
                # (A record of tfface 0.2.1 or older has no label digest.)
                changes.append(
                    f"{what} labels of source {is_['source']}: the same {count_now} images, but other label values"
                )
    return changes


def _check_same_data(project_dir: Path, record: dict) -> None:
    """Refuses to resume a search whose sources now hold other images (files
    added or removed, label rows that changed which images exist) or other
    labels for the same images: its new trials would be trained and
    validated on other data than its earlier ones and yet ranked with them.
    A search.json written before the data was recorded passes (the record
    is added when it is rewritten)."""
    previous = _previous_meta(project_dir)
    if previous is None or "data" not in previous:
        return
    changes = _data_changes(previous["data"], record)
    if changes:
        raise ConfigError(
            f"{project_dir} holds a search run on other data ({project_dir / 'search.json'} records what it "
            f"trained and validated on): {'; '.join(changes)}; resuming would rank trials validated on "
            f"different images: use another project name or remove {project_dir}"
        )


def _check_worker_data(project_dir: Path, record: Optional[dict]) -> bool:
    """Refuses to run trials on a worker whose copy of the data differs from
    the one the chief recorded: its trials would be trained and validated
    on other images and yet ranked with the others. The chief writes
    search.json before it serves the oracle, so a worker that reaches the
    chief reads the current one, when the project folder is shared; on a
    folder of its own there is nothing to compare with (returns False)."""
    previous = _previous_meta(project_dir)
    if record is None or previous is None or "data" not in previous:
        log.info("worker: no search.json of the chief in %s: its data cannot be compared with the chief's", project_dir)
        return False
    changes = _data_changes(previous["data"], record, "the chief's", "this worker's")
    if changes:
        raise ConfigError(
            f"worker {os.environ.get('KERASTUNER_TUNER_ID', '')}: its data is not the data the chief recorded in "
            f"{project_dir / 'search.json'}: {'; '.join(changes)}; its trials would be ranked with trials "
            f"validated on different images: give every worker the same data folders"
        )
    return True


def _trial_budget_record(tuning: TuningConfig) -> dict:
    """What each trial trains and how trials are drawn: trials run with other
    values would be ranked against these on unequal terms. (`max_trials`
    and the time budget may change between runs.)"""
    keys = ["executions_per_trial", "seed"]
    keys += ["max_epochs", "factor", "hyperband_iterations"] if tuning.tuner == "hyperband" else ["epochs"]
    return {key: getattr(tuning, key) for key in keys}


def _space_record(space: SearchSpace) -> list:
    return json.loads(json.dumps([dataclasses.asdict(s) for s in space.specs], default=str))


def _experiment_record(base: ExperimentConfig) -> dict:
    """The base experiment's settings that shape a trial (not where its
    runs would go, nor its name)."""
    record = json.loads(json.dumps(base.to_dict(), default=str))
    record.pop("name", None)
    record.get("train", {}).pop("output_dir", None)
    return record


def _write_meta(
    project_dir: Path, tuning: TuningConfig, base: ExperimentConfig, space: SearchSpace, data: Optional[dict] = None
) -> None:
    project_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "project": tuning.project,
        "tuner": tuning.tuner,
        "tuning_config": str(tuning.source) if tuning.source else None,
        "search_space": space.source,
        "hyperparameters": space.names,
        "objective": OBJECTIVE,
        "space": _space_record(space),
        "experiment": _experiment_record(base),
        "trial_budget": _trial_budget_record(tuning),
        "split": split_record(base.data.val_fraction, base.data.split_seed),
    }
    if data is not None:
        meta["data"] = data
    _write_json_atomic(project_dir / "search.json", meta, indent=2)


# --- results ------------------------------------------------------------------------


def trial_records(oracle, space: SearchSpace, cut_by_budget: Optional[dict] = None) -> list[dict]:
    """One plain dict per trial, in trial order; `cut_by_budget` ({trial id:
    epochs trained}) marks the trials the time budget ended early."""
    cut_by_budget = cut_by_budget or {}
    records = []
    for trial_id, trial in sorted(oracle.trials.items(), key=lambda kv: int(kv[0])):
        hp = trial.hyperparameters
        values = {}
        for name in space.names:
            if name in hp.values and hp.is_active(name):
                values[name] = _plain(hp.values[name])
        score = trial.score
        if score is not None and (isinstance(score, float) and math.isnan(score)):
            score = None
        record = {
            "trial_id": str(trial_id),
            "status": str(trial.status),
            "score": None if score is None else float(score),
            "values": values,
            "message": trial.message or None,
        }
        if "tuner/epochs" in hp.values:
            record["epochs"] = int(hp.values["tuner/epochs"])
        if str(trial_id) in cut_by_budget:
            record["cut_by_budget_after_epochs"] = int(cut_by_budget[str(trial_id)])
        records.append(record)
    return records


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def _first_error(message: str) -> str:
    lines = [line for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no message)"


def write_results(project_dir: Path, tuning: TuningConfig, base: ExperimentConfig, space: SearchSpace,
                  records: list[dict], stopped_by_budget: bool = False) -> dict:
    """Writes summary.md, objective.png, results.json and best_config.yaml;
    raises TuningError when no trial completed. A best_config.yaml edited
    since the search wrote it is kept: the new one goes beside it."""
    project_dir.mkdir(parents=True, exist_ok=True)
    completed = [r for r in records if r["status"] == "COMPLETED" and r["score"] is not None]
    full = [r for r in completed if "cut_by_budget_after_epochs" not in r]
    best = max(full, key=lambda r: r["score"]) if full else None
    paths = {
        "summary": str(project_dir / "summary.md"),
        "plot": str(project_dir / "objective.png"),
        "results": str(project_dir / "results.json"),
        "best_config": None,
    }
    written_hash = None
    if best is not None:
        best_config = space.apply(base, best["values"])
        best_config.name = f"{base.name}_tuned"
        best_config.train.output_dir = f"runs/{tuning.project}_best"
        paths["best_config"] = str(_best_config_path(project_dir, Path(paths["results"])))
        written_hash = write_best_config(best_config, paths["best_config"], tuning, best, len(records))
    best_file = Path(paths["best_config"]).name if paths["best_config"] else None
    write_atomic(paths["summary"], summary_markdown(tuning, space, records, best, stopped_by_budget, best_file))
    plot_objective(records, paths["plot"], title=f"{tuning.project}: {OBJECTIVE} per trial")
    results = {
        "project": tuning.project,
        "tuner": tuning.tuner,
        "objective": {"name": OBJECTIVE, "direction": "max"},
        "search_space": space.source,
        "stopped_by_budget": bool(stopped_by_budget),
        "trials": records,
        "best": best,
        **paths,
        "best_config_sha256": written_hash,
    }
    write_atomic(paths["results"], json.dumps(results, indent=2, default=str))
    if not records:
        raise TuningError(f"search {tuning.project}: no trial ran (see {project_dir})")
    if best is None and completed:
        raise TuningError(
            f"search {tuning.project}: the time budget ended all {len(completed)} completed trial(s) before their "
            f"last epoch, so none is comparable enough to call best; run it again with a larger "
            f"time_budget_minutes (see {paths['summary']})"
        )
    if best is None:
        first = records[0]
        raise TuningError(
            f"search {tuning.project}: all {len(records)} trials failed; first error "
            f"(trial {first['trial_id']}, {first['status']}):\n{first['message'] or '(no message)'}"
        )
    failed = [r for r in records if r["status"] != "COMPLETED"]
    if failed:
        log.warning("%d of %d trials did not complete; see %s", len(failed), len(records), paths["summary"])
    return {"trials": records, "best": best, **paths}


def _best_config_path(project_dir: Path, results_file: Path) -> Path:
    """best_config.yaml, unless the user edited it since the search wrote it
    (its hash differs from the one results.json recorded): then the new one
    goes to best_config.new.yaml and the edited file is kept."""
    path = project_dir / "best_config.yaml"
    if not path.is_file():
        return path
    try:
        recorded = json.loads(results_file.read_text()).get("best_config_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is None or hashlib.sha256(path.read_bytes()).hexdigest() == recorded:
        return path
    log.warning("%s was changed since the search wrote it: kept it; the best config goes to best_config.new.yaml", path)
    return project_dir / "best_config.new.yaml"


def write_best_config(config: ExperimentConfig, path, tuning: TuningConfig, best: dict, num_trials: int) -> str:
    """Writes the config; returns the SHA-256 of what it wrote."""
    import yaml

    from tfface.config import _plain as plain_config

    header = (
        f"# Best of {num_trials} trials of tuning project '{tuning.project}' ({tuning.tuner} search):\n"
        f"# trial {best['trial_id']}, {OBJECTIVE} = {best['score']:.4f}.\n"
        f"# Train it: tfface train --config {path}\n"
    )
    body = yaml.safe_dump(plain_config(config.to_dict()), sort_keys=False)
    text = header + body
    write_atomic(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _format(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_markdown(
    tuning: TuningConfig, space: SearchSpace, records: list[dict], best: Optional[dict], stopped_by_budget=False,
    best_file="best_config.yaml",
) -> str:
    """Markdown: the search, its best trial, and a table of every trial."""
    statuses = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    lines = [
        f"# Tuning results: {tuning.project}",
        "",
        f"- tuner: {tuning.tuner}; objective: {OBJECTIVE} (max)",
        f"- trials: {len(records)} ({', '.join(f'{n} {s.lower()}' for s, n in sorted(statuses.items())) or 'none'})",
    ]
    if stopped_by_budget:
        lines.append(f"- the time budget ({tuning.time_budget_minutes:g} min) stopped this run of the search")
    cut = [r for r in records if "cut_by_budget_after_epochs" in r]
    if cut:
        lines.append(
            f"- {len(cut)} trial(s) cut short by the time budget (status `completed, cut`): "
            "scored on fewer epochs, so never the best"
        )
    if best is not None:
        lines.append(f"- best: trial {best['trial_id']}, {OBJECTIVE} = {best['score']:.4f} -> {best_file}")
    lines += ["", "## Trials", ""]
    names = space.names
    with_epochs = any("epochs" in r for r in records)
    header = ["trial", "status", OBJECTIVE] + (["epochs"] if with_epochs else []) + names
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" if h in (OBJECTIVE, "epochs") else "---" for h in header) + "|")
    for r in records:
        status = r["status"].lower()
        if "cut_by_budget_after_epochs" in r:
            status += f", cut after {r['cut_by_budget_after_epochs']} epoch(s)"
        row = [r["trial_id"], status, _format(r["score"])]
        if with_epochs:
            row.append(_format(r.get("epochs")))
        row += [_format(r["values"].get(n)) for n in names]
        lines.append("| " + " | ".join(row) + " |")
    failed = [r for r in records if r["status"] != "COMPLETED" and r["message"]]
    if failed:
        lines += ["", "## Errors", ""]
        lines += [f"- trial {r['trial_id']}: `{_first_error(r['message'])}`" for r in failed]
    lines += ["", "## Search space", "", space.to_markdown(), ""]
    return "\n".join(lines)


def plot_objective(records: list[dict], path, title: str) -> None:
    """PNG of the objective against trial number, with the best so far."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    done = [(int(r["trial_id"]), r["score"]) for r in records if r["score"] is not None]
    failed = [int(r["trial_id"]) for r in records if r["score"] is None]
    if done:
        xs, ys = zip(*done)
        axes.plot(xs, ys, "o", label="trial")
        best, running = [], -math.inf
        for y in ys:
            running = max(running, y)
            best.append(running)
        axes.step(xs, best, where="post", label="best so far")
    if failed:
        floor = min((y for _, y in done), default=0.0)
        axes.plot(failed, [floor] * len(failed), "x", color="red", label="failed")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel(OBJECTIVE)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if done or failed:
        axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")


# --- CLI ----------------------------------------------------------------------------


def tune_main(args) -> dict:
    """`tfface tune --config FILE`."""
    summary = run_search(args.config)
    if summary["role"] == "worker":
        compared = "compared with" if summary["data_compared_with_chief"] else "could not be compared with"
        print(f"worker {summary['tuner_id']} ran trials {summary['trials_run']}; its data {compared} the chief's")
        return summary
    best = summary["best"]
    print(
        f"{len(summary['trials'])} trials; best trial {best['trial_id']} (folder trial_{best['trial_id']}/; "
        f"KerasTuner's log counts from 1: 'Trial {_console_number(best['trial_id'])}'): {OBJECTIVE} = {best['score']:.4f}"
    )
    print(f"best config: {summary['best_config']}  (train it: tfface train --config {summary['best_config']})")
    print(f"summary: {summary['summary']}; plot: {summary['plot']}")
    return summary


def _console_number(trial_id) -> str:
    """KerasTuner's console name of a trial ("Trial 5" for trial_4/)."""
    return str(int(trial_id) + 1) if str(trial_id).isdigit() else str(trial_id)
