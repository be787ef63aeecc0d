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

This module drives a search; its parts lie beside it: the tuning config
(config.py), the data trials share and its record (search_data.py), the
project's search.json and the checks made on resuming (search_record.py),
KerasTuner's tuners as tfface runs them (tuners.py), the chief and
workers (distributed.py) and the result files (results.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Optional

from tfface.atomic_files import claimed_folder
from tfface.config import ConfigError
from tfface.tuning.config import OBJECTIVE
from tfface.tuning.config import TuningConfig
from tfface.tuning.config import TuningError
from tfface.tuning.distributed import distributed_role
from tfface.tuning.distributed import wait_for_chief
from tfface.tuning.results import trial_records
from tfface.tuning.results import write_results
from tfface.tuning.search_data import SearchData
from tfface.tuning.search_data import load_search_data
from tfface.tuning.search_data import read_data_record
from tfface.tuning.search_record import check_same_data
from tfface.tuning.search_record import check_same_search
from tfface.tuning.search_record import check_worker_data
from tfface.tuning.search_record import write_meta
from tfface.tuning.tuners import cut_trials
from tfface.tuning.tuners import make_tuner
from tfface.tuning.tuners import release_memory

# Re-exported: these were defined here before the search was split into
# the modules above, and stay importable from here.
from tfface.tuning.config import TUNERS
from tfface.tuning.distributed import serve_oracle
from tfface.tuning.results import plot_objective
from tfface.tuning.results import summary_markdown
from tfface.tuning.results import write_best_config
from tfface.tuning.search_data import IMAGE_IDS
from tfface.tuning.search_data import LABELS
from tfface.tuning.search_data import data_record
from tfface.tuning.search_data import image_ids
from tfface.tuning.tuners import CUT_TRIALS_FILE

__all__ = [
    "CUT_TRIALS_FILE", "IMAGE_IDS", "LABELS", "OBJECTIVE", "SearchData", "TUNERS", "TuningConfig", "TuningError",
    "data_record", "image_ids", "load_search_data", "make_tuner", "plot_objective", "prepare", "read_data_record",
    "run_search", "serve_oracle", "summary_markdown", "trial_records", "tune_main", "write_best_config",
    "write_results",
]

log = logging.getLogger(__name__)


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
    distributed_role()  # checks the KerasTuner environment variables
    return tuning, base, space


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
    role = distributed_role()
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
        check_same_search(project_dir, tuning, base, space)
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
        check_same_data(project_dir, record)
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
        wait_for_chief(tuning.chief_wait_minutes)
        data_compared = check_worker_data(project_dir, getattr(data, "data_record", None))
    tuner = make_tuner(tuning, hypermodel, deadline=deadline, on_trial_end_hook=on_trial_end)
    if role != "worker":
        write_meta(project_dir, tuning, base, space, record)
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
    release_memory()

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
    records = trial_records(tuner.oracle, space, cut_trials(project_dir))
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
