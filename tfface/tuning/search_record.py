"""search.json: what the search in a project folder was run with.

KerasTuner resumes whatever its oracle holds, so a search resumed as
another tuner, over another space, base experiment, trial budget, split or
data would silently rank the trials of two searches together. The record
is written before any trial and checked on every resume, and by every
worker, to refuse that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

from tfface.atomic_files import write_atomic
from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.data.splits import split_method_problem
from tfface.data.splits import split_record
from tfface.tuning.config import OBJECTIVE
from tfface.tuning.config import TuningConfig
from tfface.tuning.config import TuningError
from tfface.tuning.search_data import data_changes
from tfface.tuning.search_space import SearchSpace

log = logging.getLogger(__name__)


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


def check_same_search(project_dir: Path, tuning: TuningConfig, base: ExperimentConfig, space: SearchSpace) -> None:
    """Refuses to resume a search as another tuner, over another space or
    base experiment: KerasTuner would keep sampling the space stored in its
    oracle and silently mix trials of two searches. (The data itself is
    checked by `check_same_data`, once it is read.)"""
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


def check_same_data(project_dir: Path, record: dict) -> None:
    """Refuses to resume a search whose sources now hold other images (files
    added or removed, label rows that changed which images exist) or other
    labels for the same images: its new trials would be trained and
    validated on other data than its earlier ones and yet ranked with them.
    A search.json written before the data was recorded passes (the record
    is added when it is rewritten)."""
    previous = _previous_meta(project_dir)
    if previous is None or "data" not in previous:
        return
    changes = data_changes(previous["data"], record)
    if changes:
        raise ConfigError(
            f"{project_dir} holds a search run on other data ({project_dir / 'search.json'} records what it "
            f"trained and validated on): {'; '.join(changes)}; resuming would rank trials validated on "
            f"different images: use another project name or remove {project_dir}"
        )


def check_worker_data(project_dir: Path, record: Optional[dict]) -> bool:
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
    changes = data_changes(previous["data"], record, "the chief's", "this worker's")
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


def write_meta(
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
    write_atomic(project_dir / "search.json", json.dumps(meta, indent=2))
