"""Search spaces as YAML files: which config fields a search varies, and how.

A search space is edited by users, not coded, so it lives in a YAML file
(see tuning/*_search_space.yaml). Each key names a config field, each value
says how to sample it:

```yaml
gate: {type: choice, values: [none, static, input_conditioned]}
gate_init: {type: float, min: 0.0, max: 4.0, when: {gate: [static, input_conditioned]}}
learning_rate: {type: float, min: 1.0e-4, max: 1.0e-2, sampling: log}
loss_weights.age_group: {type: float, min: 0.25, max: 4.0, sampling: log}
correlation: {type: boolean}
```

Keys are `ModelConfig` fields (optionally written `model.gate`), `TrainConfig`
fields (`train.learning_rate`) or `loss_weights.<family or task>`. Types:
`float` and `int` (min, max, optional step, sampling linear | log |
reverse_log), `choice` (values), `boolean`, `fixed` (value). `when:
{parent: [values]}` makes a hyperparameter live only while a choice or
boolean declared above it takes one of those values (KerasTuner's
conditional scopes), so a search does not waste samples on a gate
initialisation when there is no gate.

Every mistake (unknown name, empty range, a type the field cannot take, a
value the config refuses) raises `ConfigError` naming the file and the
hyperparameter, before any data is read or any trial runs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Optional

from tfface.config import LOSS_FAMILIES
from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.config import ModelConfig
from tfface.config import TrainConfig
from tfface.config import read_structured_file

log = logging.getLogger(__name__)

SPEC_TYPES = ("float", "int", "choice", "boolean", "fixed")
SAMPLINGS = ("linear", "log", "reverse_log")

# Tunable ModelConfig fields and the model types they change. Fields that
# reshape the data (image_size) or the inputs (use_landmark_masks) are not
# tunable: the data is loaded once for the whole search.
MODEL_FIELDS = {
    "backbone": ("gated", "mask_guided"),
    "embedding_dim": ("gated", "mask_guided"),
    "dropout": ("gated", "mask_guided"),
    "gate": ("gated",),
    "gate_init": ("gated",),
    "gate_hidden": ("gated",),
    "gate_bottleneck": ("gated",),
    "num_experts": ("gated",),
    "correlation": ("gated",),
    "correlation_init": ("gated",),
    "correlation_init_scale": ("gated",),
    "center_loss_weight": ("gated",),
    "center_update_rate": ("gated",),
    "deep_supervision": ("gated",),
    "mask_loss_weight": ("mask_guided",),
    "fusion": ("mask_guided",),
    "mask_trainable": ("mask_guided",),
}
TRAIN_FIELDS = ("learning_rate", "weight_decay", "optimizer", "warmup_epochs")
LOSS_WEIGHT_PREFIX = "loss_weights."

_SPEC_KEYS = {
    "float": {"type", "min", "max", "step", "sampling", "default", "when"},
    "int": {"type", "min", "max", "step", "sampling", "default", "when"},
    "choice": {"type", "values", "default", "when"},
    "boolean": {"type", "default", "when"},
    "fixed": {"type", "value"},
}


def tunable_names() -> list[str]:
    return sorted(MODEL_FIELDS) + sorted(TRAIN_FIELDS) + [LOSS_WEIGHT_PREFIX + "<family or task>"]


def _field_type(section: str, field: str) -> type:
    """The Python type a config field holds (from its dataclass default)."""
    if section == "loss_weights":
        return float
    default = getattr(ModelConfig() if section == "model" else TrainConfig(), field)
    return type(default)


@dataclasses.dataclass(frozen=True)
class HyperParameterSpec:
    """One line of a search-space file, checked."""

    name: str  # canonical: "gate", "learning_rate", "loss_weights.age_group"
    section: str  # "model", "train" or "loss_weights"
    field: str  # the attribute (or loss-weight key) it sets
    type: str
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    sampling: str = "linear"
    values: tuple = ()
    value: Any = None
    default: Any = None
    when: Optional[tuple] = None  # (parent name, tuple of parent values)

    def candidate_values(self) -> list:
        """Values worth checking against the config: the ends and every choice."""
        if self.type in ("float", "int"):
            return [self.min, self.max]
        if self.type == "choice":
            return list(self.values)
        if self.type == "boolean":
            return [False, True]
        return [self.value]

    def register(self, hp):
        """Declares this hyperparameter on a `keras_tuner.HyperParameters`;
        returns its value, or None while its `when` condition is off."""
        if self.when is None:
            return self._register(hp)
        parent, values = self.when
        with hp.conditional_scope(parent, list(values)):
            return self._register(hp)

    def _register(self, hp):
        if self.type == "float":
            return hp.Float(
                self.name, self.min, self._tuner_max(), step=self.step, sampling=self.sampling, default=self.default
            )
        if self.type == "int":
            return hp.Int(
                # No step: KerasTuner's default (1 for linear; log sampling
                # without a step samples continuously and rounds).
                self.name, int(self.min), int(self.max), step=None if self.step is None else int(self.step),
                sampling=self.sampling,
                default=self.default,
            )
        if self.type == "choice":
            return hp.Choice(self.name, list(self.values), default=self.default)
        if self.type == "boolean":
            return hp.Boolean(self.name, default=bool(self.default))
        return hp.Fixed(self.name, self.value)

    def _tuner_max(self) -> float:
        """The float range's top as KerasTuner must be told it. It counts the
        values of a stepped linear range as `(max - min) // step + 1`, and in
        floating point `0.5 // 0.05` is 9: the top (dropout 0.5) was never
        tried. A top on the step grid is raised by a billionth of a step,
        which gives the right count and no value beyond the top."""
        if self.sampling != "linear" or not self.step:
            return self.max
        steps = (self.max - self.min) / self.step
        if abs(steps - round(steps)) > 1e-6:
            return self.max  # a top off the grid is not a value either way
        return self.max + self.step * 1e-9

    def describe(self) -> str:
        if self.type in ("float", "int"):
            text = f"{self.type} [{self.min:g}, {self.max:g}]"
            if self.sampling != "linear":
                text += f" {self.sampling}"
            if self.step:
                text += f" step {self.step:g}"
        elif self.type == "choice":
            text = "one of " + ", ".join(str(v) for v in self.values)
        elif self.type == "boolean":
            text = "true or false"
        else:
            text = f"fixed {self.value!r}"
        if self.when:
            text += f" (when {self.when[0]} in {list(self.when[1])})"
        return text


class SearchSpace:
    """The checked hyperparameters of a search-space file, in file order."""

    def __init__(self, specs, source: str = "<search space>"):
        self.specs = list(specs)
        self.source = source

    def __len__(self):
        return len(self.specs)

    def __iter__(self):
        return iter(self.specs)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    # --- loading ------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> "SearchSpace":
        raw = read_structured_file(path, "search space file")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw, source: str = "<search space>") -> "SearchSpace":
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{source}: a search space must be a non-empty mapping of name: {{type: ...}}")
        specs = []
        for key, spec in raw.items():
            try:
                specs.append(_parse_spec(key, spec, specs))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        return cls(specs, source)

    # --- checks against an experiment -------------------------------------------
    def check(self, config: ExperimentConfig) -> "SearchSpace":
        """Checks the space against the base experiment it will vary.

        Refuses fields the model type does not use and values the config
        refuses; drops (with a warning) loss weights of a task family the
        schema does not have, so one space file serves several datasets.
        Returns the space to search.
        """
        from tfface.config import loss_family
        from tfface.schema import get_schema

        schema = get_schema(config.data.schema)
        families = {loss_family(t) for t in schema}
        model_type = config.model.type
        kept = []
        for spec in self.specs:
            where = f"{self.source}: hyperparameter '{spec.name}'"
            if spec.section == "model" and model_type not in MODEL_FIELDS[spec.field]:
                raise ConfigError(
                    f"{where} has no effect on model type '{model_type}' "
                    f"(it tunes {' and '.join(MODEL_FIELDS[spec.field])} models)"
                )
            if spec.section == "loss_weights":
                if spec.field not in LOSS_FAMILIES and spec.field not in schema.task_names:
                    raise ConfigError(
                        f"{where}: '{spec.field}' is neither a loss family {list(LOSS_FAMILIES)} "
                        f"nor a task of schema '{schema.name}'"
                    )
                if spec.field in LOSS_FAMILIES and spec.field not in families:
                    log.warning("%s: schema '%s' has no %s task; not searched", where, schema.name, spec.field)
                    continue
            if spec.when and spec.when[0] not in {s.name for s in kept}:
                raise ConfigError(f"{where}: its 'when' parent '{spec.when[0]}' is not searched")
            for value in spec.candidate_values():
                try:
                    self.apply(config, {spec.name: value}, specs=[spec])
                except ConfigError as e:
                    raise ConfigError(f"{where}: value {value!r} is refused: {e}") from None
            kept.append(spec)
        if not kept:
            raise ConfigError(f"{self.source}: nothing left to search for this experiment")
        return SearchSpace(kept, self.source)

    def possible_values(self, config: ExperimentConfig, section: str, field: str) -> set:
        """Every value a trial's `section.field` may take: the base
        experiment's, and the searched ones."""
        base = config.model if section == "model" else config.train
        values = {getattr(base, field)}
        for spec in self.specs:
            if (spec.section, spec.field) == (section, field):
                values.update(spec.candidate_values())
        return values

    def check_trial_schedule(self, config: ExperimentConfig, trial_epochs: int) -> None:
        """Refuses a warm-up longer than a trial: a trial's learning-rate
        schedule spans the epochs it trains, not the experiment's
        `train.epochs`, so the rate being tuned would never be reached (as
        `tfface train` refuses for a run)."""
        longest = max(self.possible_values(config, "train", "warmup_epochs"))
        if longest > trial_epochs:
            raise ConfigError(
                f"{self.source}: warmup_epochs reaches {longest:g} (experiment or search space), longer than "
                f"the {trial_epochs} epoch(s) a trial trains: its learning rate would never reach the value "
                "being tuned; lower warmup_epochs or train each trial longer (tuning epochs)"
            )

    # --- use -----------------------------------------------------------------------
    def declare(self, hp) -> dict:
        """Declares every hyperparameter; returns the active values."""
        values = {}
        for spec in self.specs:
            value = spec.register(hp)
            if value is not None and hp.is_active(spec.name):
                values[spec.name] = value
        return values

    def apply(self, config: ExperimentConfig, values: dict, specs=None) -> ExperimentConfig:
        """A validated copy of `config` with the hyperparameter values set.

        Names not in this space (KerasTuner's own "tuner/epochs", ...) are
        ignored.
        """
        by_name = {s.name: s for s in (specs or self.specs)}
        config = copy.deepcopy(config)
        for name, value in values.items():
            spec = by_name.get(name)
            if spec is None:
                continue
            value = _plain_value(value, _field_type(spec.section, spec.field))
            if spec.section == "loss_weights":
                config.model.loss_weights = dict(config.model.loss_weights, **{spec.field: value})
            elif spec.section == "model":
                setattr(config.model, spec.field, value)
            else:
                setattr(config.train, spec.field, value)
        return config.validate()

    def to_markdown(self) -> str:
        lines = ["| hyperparameter | range |", "|---|---|"]
        lines += [f"| {s.name} | {s.describe()} |" for s in self.specs]
        return "\n".join(lines)


# --- parsing ---------------------------------------------------------------------


def _resolve_name(key) -> tuple[str, str, str]:
    """(canonical name, section, field) of a search-space key."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"hyperparameter names must be strings, got {key!r}")
    name = key
    for prefix in ("model.", "train."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith(LOSS_WEIGHT_PREFIX):
        field = name[len(LOSS_WEIGHT_PREFIX):]
        if not field or key.startswith("train."):
            raise ConfigError(f"unknown hyperparameter '{key}': write loss_weights.<family or task>")
        return name, "loss_weights", field
    if name in MODEL_FIELDS and not key.startswith("train."):
        return name, "model", name
    if name in TRAIN_FIELDS and not key.startswith("model."):
        return name, "train", name
    raise ConfigError(f"unknown hyperparameter '{key}'; tunable: {', '.join(tunable_names())}")


def _number(name, key, value, integer=False):
    if isinstance(value, bool):
        raise ConfigError(f"hyperparameter '{name}': '{key}' must be a number, got {value!r}")
    if isinstance(value, str):
        # PyYAML reads 1e-4 (no dot) as a string.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"hyperparameter '{name}': '{key}' must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"hyperparameter '{name}': '{key}' must be a number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise ConfigError(f"hyperparameter '{name}': '{key}' must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def _plain_value(value, field_type):
    if field_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if field_type is int and isinstance(value, float) and value == int(value):
        return int(value)
    return value


def _value_fits(value, field_type) -> bool:
    if field_type is bool:
        return isinstance(value, bool)
    if field_type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if field_type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, field_type)


def _parse_spec(key, raw, earlier) -> HyperParameterSpec:
    name, section, field = _resolve_name(key)
    if any(s.name == name for s in earlier):
        raise ConfigError(f"hyperparameter '{name}' is given twice")
    if not isinstance(raw, dict):
        raise ConfigError(f"hyperparameter '{key}' must be a mapping like {{type: float, min: 0, max: 1}}, got {raw!r}")
    kind = raw.get("type")
    if kind not in SPEC_TYPES:
        raise ConfigError(f"hyperparameter '{key}': type must be one of {list(SPEC_TYPES)}, got {kind!r}")
    unknown = sorted(set(raw) - _SPEC_KEYS[kind])
    if unknown:
        raise ConfigError(f"hyperparameter '{key}': unknown key(s) {unknown} for type {kind}")
    field_type = _field_type(section, field)
    type_name = {float: "a number", int: "an integer", bool: "true/false", str: "a string"}[field_type]
    spec = dict(name=name, section=section, field=field, type=kind)

    if kind in ("float", "int"):
        if field_type not in (float, int) or (kind == "float" and field_type is int):
            raise ConfigError(f"hyperparameter '{key}': type {kind} does not fit the field, which takes {type_name}")
        for bound in ("min", "max"):
            if bound not in raw:
                raise ConfigError(f"hyperparameter '{key}': type {kind} needs '{bound}'")
        integer = kind == "int"
        low, high = _number(key, "min", raw["min"], integer), _number(key, "max", raw["max"], integer)
        if low >= high:
            raise ConfigError(f"hyperparameter '{key}': empty range, min ({low:g}) must be < max ({high:g})")
        sampling = raw.get("sampling", "linear")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"hyperparameter '{key}': sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
        if sampling != "linear" and low <= 0:
            raise ConfigError(f"hyperparameter '{key}': {sampling} sampling needs min > 0, got {low:g}")
        step = raw.get("step")
        if step is not None:
            step = _number(key, "step", step, integer)
            if sampling == "linear" and (step <= 0 or step > high - low):
                raise ConfigError(f"hyperparameter '{key}': step must be in (0, max - min], got {step:g}")
            if sampling != "linear" and (step <= 1 or step > high / low):
                raise ConfigError(
                    f"hyperparameter '{key}': with {sampling} sampling the step is a factor and must be in "
                    f"(1, max / min], got {step:g}"
                )
        spec.update(min=low, max=high, step=step, sampling=sampling)
        if raw.get("default") is not None:
            default = _number(key, "default", raw["default"], integer)
            if not low <= default <= high:
                raise ConfigError(f"hyperparameter '{key}': default {default:g} is outside [{low:g}, {high:g}]")
            spec["default"] = default
    elif kind == "choice":
        values = raw.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"hyperparameter '{key}': choice needs a non-empty 'values' list, got {values!r}")
        if field_type is float:
            values = [_number(key, "values", v) for v in values]
        for v in values:
            if not _value_fits(v, field_type):
                raise ConfigError(
                    f"hyperparameter '{key}': value {v!r} does not fit the field, which takes {type_name}"
                )
        if len(set(values)) != len(values):
            raise ConfigError(f"hyperparameter '{key}': repeated values in {values}")
        spec["values"] = tuple(values)
        if raw.get("default") is not None:
            # Parsed as the values are: YAML reads 1e-3 (no dot) as a string.
            default = _number(key, "default", raw["default"]) if field_type is float else raw["default"]
            if default not in values:
                raise ConfigError(f"hyperparameter '{key}': default {raw['default']!r} is not one of {values}")
            spec["default"] = default
    elif kind == "boolean":
        if field_type is not bool:
            raise ConfigError(f"hyperparameter '{key}': type boolean does not fit the field, which takes {type_name}")
        default = raw.get("default", False)
        if not isinstance(default, bool):
            raise ConfigError(f"hyperparameter '{key}': default must be true or false, got {default!r}")
        spec["default"] = default
    else:
        if "value" not in raw:
            raise ConfigError(f"hyperparameter '{key}': type fixed needs 'value'")
        value = raw["value"]
        if field_type is float and isinstance(value, str):
            value = _number(key, "value", value)
        if not _value_fits(value, field_type):
            raise ConfigError(
                f"hyperparameter '{key}': value {value!r} does not fit the field, which takes {type_name}"
            )
        spec["value"] = value

    if "when" in raw:
        spec["when"] = _parse_when(key, raw["when"], earlier)
    return HyperParameterSpec(**spec)


def _parse_when(key, when, earlier) -> tuple:
    if not isinstance(when, dict) or len(when) != 1:
        raise ConfigError(f"hyperparameter '{key}': 'when' must be one mapping {{parent: [values]}}, got {when!r}")
    (parent_key, values), = when.items()
    parent_name = _resolve_name(parent_key)[0]
    parents = [s for s in earlier if s.name == parent_name]
    if not parents:
        raise ConfigError(f"hyperparameter '{key}': 'when' parent '{parent_key}' must be declared above it")
    parent = parents[0]
    if parent.when is not None:
        raise ConfigError(
            f"hyperparameter '{key}': 'when' parent '{parent_key}' is itself conditional (on "
            f"'{parent.when[0]}'); nested conditions are not supported, make '{key}' depend on "
            f"'{parent.when[0]}' instead"
        )
    if parent.type not in ("choice", "boolean"):
        raise ConfigError(f"hyperparameter '{key}': 'when' parent '{parent_key}' must be a choice or boolean")
    values = values if isinstance(values, list) else [values]
    allowed = list(parent.values) if parent.type == "choice" else [False, True]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ConfigError(
            f"hyperparameter '{key}': 'when' values {bad or values} are not values of '{parent_key}' {allowed}"
        )
    return parent_name, tuple(values)
