"""The tuning config and the error a search raises.

Every part of a search (its data, tuners, distributed roles, results)
reads its settings from a `TuningConfig` and reports with `TuningError`;
kept apart from the search that drives them so that none of those parts
has to import it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.config import read_structured_file
from tfface.tuning.search_space import SearchSpace


TUNERS = ("random", "hyperband", "bayesian")
OBJECTIVE = "val_mean_balanced_accuracy"
_PROJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TuningError(RuntimeError):
    """A search that produced no usable trial (every trial failed)."""


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
