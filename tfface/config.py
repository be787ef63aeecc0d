"""Typed experiment configs, loaded from YAML and checked before any work.

An `ExperimentConfig` = `DataConfig` + `ModelConfig` + `TrainConfig`. Files
are YAML (or JSON) mirroring these dataclasses; unknown keys and bad values
are refused with a message naming the key, before any data is read or any
model is built. A `model:` section may start from a named architecture,
`preset: NAME` (see `tfface.presets`), and override keys beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import json
import numbers
import os
from pathlib import Path
from typing import Any, Optional

MODEL_TYPES = ("gated", "mask_guided")
GATE_TYPES = ("none", "static", "input_conditioned", "mixture_of_experts")
BACKBONES = (
    "small_cnn",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "resnet50",
)
# data.cache, besides true (= "auto") and false (see tfface.data.pipeline).
CACHE_CHOICES = ("auto", "memory", "disk")
# Loss-weight families: every binary attribute except gender shares one.
LOSS_FAMILIES = ("attributes", "age_group", "gender", "race")


def loss_family(task) -> str:
    """The loss-weight family of a schema task. CelebA's `Male` column is
    the gender task of the celeba schema, so `gender` weights it too."""
    if task.name == "Male":
        return "gender"
    return task.name if task.name in LOSS_FAMILIES[1:] else "attributes"


class ConfigError(ValueError):
    """A config value or key that cannot work; names the key."""


def cache_mode(cache) -> str:
    """`data.cache` (and `make_dataset(cache=)`) as "auto", "memory", "disk"
    or "none"; true is "auto" (it used to mean "memory", which is what
    "auto" picks whenever the images fit). Anything else is a ValueError
    listing the choices."""
    if cache is True:
        return "auto"
    if cache is False:
        return "none"
    if isinstance(cache, str) and cache in CACHE_CHOICES:
        return cache
    raise ValueError(f"cache must be one of [true, false, {', '.join(repr(c) for c in CACHE_CHOICES)}], got {cache!r}")


@dataclasses.dataclass
class SourceConfig:
    """One data source of a fused stream.

    `path` is a folder (format detected) or a named source ("synthetic:N",
    "celeba_sample", "celeba_lowres", "utkface").
    """

    path: str
    # Share of training examples drawn from this source, relative to the
    # other sources' weights, whatever their sizes (a single source ignores it).
    weight: float = 1.0
    landmarks: Optional[str] = None  # landmark cache file, if not beside the data
    # Skip malformed label rows and missing images of a folder (each skip is
    # logged and listed in train_summary.json) instead of stopping at the first.
    skip_bad_rows: bool = False
    # Leave out the images that do not decode (corrupt, cut short, an
    # unsupported kind), found by decoding every image once before training
    # and listed in train_summary.json, instead of stopping at the first.
    skip_bad_images: bool = False


@dataclasses.dataclass
class DataConfig:
    sources: list = dataclasses.field(default_factory=lambda: [SourceConfig("synthetic:2000")])
    schema: Any = "synthetic"  # preset name, file path, or inline mapping
    image_size: int = 64
    batch_size: int = 32
    val_fraction: float = 0.15
    split_seed: int = 20240601
    augment: bool = True
    # Decoded images kept after the first pass: "auto" (in memory while they
    # take at most a quarter of it, else in files of a folder of the run,
    # else not at all; logged), "memory", "disk", or false. true is "auto".
    cache: Any = "auto"
    # Images with landmarks also yield group masks at image_size // 4
    # (needed by the mask-guided model).
    with_masks: bool = False


@dataclasses.dataclass
class ModelConfig:
    """Everything that shapes the network; saved inside every `.keras` file."""

    type: str = "gated"
    backbone: str = "small_cnn"
    backbone_widths: tuple = (32, 64, 128, 256)
    backbone_weights: Optional[str] = None  # None, a local file, or "imagenet"
    image_size: int = 64
    embedding_dim: int = 128
    dropout: float = 0.1
    # Gated MTL-CNN.
    gate: str = "static"
    gate_init: float = 2.0
    gate_hidden: int = 64
    # gate "mixture_of_experts": shared experts each task mixes (MMoE,
    # docs/design.md); embedding_dim is each expert's width.
    num_experts: int = 4
    # 0: gate the backbone's pooled channels (docs/design.md). N > 0: gate a
    # shared N-channel bottleneck of them instead, so the per-task work
    # scales with N rather than the backbone's width (cheaper heads, lower
    # accuracy: docs/results.md). Gated models only, like the keys above.
    gate_bottleneck: int = 0
    correlation: bool = True
    # "identity" (C = 0) or "label_correlation": C starts from the phi
    # coefficients of the training labels, times correlation_init_scale.
    correlation_init: str = "identity"
    correlation_init_scale: float = 0.1
    center_loss_weight: float = 0.01
    center_update_rate: float = 0.5
    # Mask-guided network.
    mask_channels: tuple = (16, 32, 64)
    mask_loss_weight: float = 0.1
    mask_trainable: bool = True
    fusion: str = "group_global"  # "global", "group", "group_global"
    use_landmark_masks: bool = False  # use masks drawn from landmarks at inference
    # Loss weights per family (see LOSS_FAMILIES) and per task name.
    loss_weights: dict = dataclasses.field(default_factory=dict)
    deep_supervision: bool = True

    def validate(self):
        _check_types("model.", self)
        _check_finite("model.", self)
        _check_choice("model.type", self.type, MODEL_TYPES)
        _check_choice("model.gate", self.gate, GATE_TYPES)
        _check_choice("model.backbone", self.backbone, BACKBONES)
        _check_choice("model.fusion", self.fusion, ("global", "group", "group_global"))
        _check_choice("model.correlation_init", self.correlation_init, ("identity", "label_correlation"))
        if self.image_size < 32 or self.image_size % 16:
            raise ConfigError(f"model.image_size must be a multiple of 16 and >= 32, got {self.image_size}")
        if self.backbone != "small_cnn" and self.image_size % 32:
            # Otherwise the stride-32 map is ceil(S/32) wide and the pyramid
            # would be read from the wrong layers.
            raise ConfigError(
                f"model.image_size must be a multiple of 32 for the {self.backbone} backbone "
                f"(its last feature map has stride 32), got {self.image_size}"
            )
        if self.type == "mask_guided" and (self.gate == "mixture_of_experts" or self.gate_bottleneck):
            raise ConfigError(
                "model.gate 'mixture_of_experts' and model.gate_bottleneck are options of the gated model; "
                "the mask-guided model routes by face-part masks (remove them or use type: gated)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for key in ("embedding_dim", "gate_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be positive")
        # Checked here, not first when the network is built: a run must not
        # save a config it cannot train.
        if self.backbone == "small_cnn" and self.backbone_weights not in (None, ""):
            raise ConfigError(
                f"model.backbone_weights: small_cnn has no pretrained weights (got {self.backbone_weights!r}); "
                "set it to null, or pick a keras.applications backbone"
            )
        widths = list(self.backbone_widths)
        if self.backbone == "small_cnn" and (len(widths) != 4 or min(widths) < 1):
            raise ConfigError(f"model.backbone_widths must be 4 positive stage widths for small_cnn, got {widths}")
        channels = list(self.mask_channels)
        predicts_masks = self.type == "mask_guided" and self.fusion != "global"
        if predicts_masks and (len(channels) < 2 or min(channels) < 1):
            raise ConfigError(f"model.mask_channels must be >= 2 positive widths, got {channels}")
        if predicts_masks and self.image_size % (4 * 2 ** (len(channels) - 1)):
            raise ConfigError(
                f"model.image_size ({self.image_size}) must be divisible by {4 * 2 ** (len(channels) - 1)} "
                f"for {len(channels)} mask_channels levels"
            )
        if self.num_experts < 2:
            raise ConfigError(f"model.num_experts must be >= 2 (a mixture routes between experts), got {self.num_experts}")
        if self.gate_bottleneck < 0:
            raise ConfigError(f"model.gate_bottleneck must be >= 0 (0: no bottleneck), got {self.gate_bottleneck}")
        for key in ("center_loss_weight", "center_update_rate", "mask_loss_weight", "correlation_init_scale"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {getattr(self, key)}")
        for key, value in self.loss_weights.items():
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"model.loss_weights.{key} must be a finite number >= 0, got {value!r}")
            self.loss_weights[key] = float(value)  # plain, so the config saves as YAML


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 5
    steps_per_epoch: Optional[int] = None  # None: one pass over the fused data
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup_epochs: float = 0.0
    early_stopping_patience: int = 0  # 0 disables
    # Per invocation, checked after each attribute epoch (so one always runs);
    # the mask pretraining's time counts toward it.
    time_budget_minutes: Optional[float] = None
    strategy: str = "default"  # "default", "mirrored", "multi_worker"
    # multi_worker: how long a worker waits for the others to start before it
    # gives up with an error (null: no limit).
    cluster_wait_minutes: Optional[float] = 15.0
    mixed_precision: str = "auto"  # "auto" (on with a GPU), "on", "off"
    seed: int = 0
    # The same seed gives the same split, initial weights, data order and
    # augmentation, but TensorFlow's parallel kernels still sum in varying
    # orders; true makes every op deterministic (slower, process-wide).
    deterministic: bool = False
    output_dir: str = "runs/default"
    # Mask-guided model: epochs that train the mask predictor alone on the
    # landmark masks before the attribute network (MGMTN's stage 1; the
    # predictor is then frozen when model.mask_trainable is false).
    mask_pretrain_epochs: int = 0


@dataclasses.dataclass
class ExperimentConfig:
    name: str = "default"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def validate(self) -> "ExperimentConfig":
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {self.name!r}")
        _check_types("data.", self.data)
        _check_finite("data.", self.data)
        for i, source in enumerate(self.data.sources):
            if not isinstance(source, SourceConfig):
                raise ConfigError(f"data.sources[{i}] must be a source (path, weight, landmarks), got {source!r}")
            _check_types(f"data.sources[{i}].", source)
            _check_finite(f"data.sources[{i}].", source)
        if isinstance(self.train.mixed_precision, bool):  # YAML reads an unquoted on / off as true / false
            self.train.mixed_precision = "on" if self.train.mixed_precision else "off"
        _check_types("train.", self.train)
        _check_finite("train.", self.train)
        self.model.validate()
        if self.data.image_size != self.model.image_size:
            raise ConfigError(
                f"data.image_size ({self.data.image_size}) and model.image_size "
                f"({self.model.image_size}) differ"
            )
        if not self.data.sources:
            raise ConfigError("data.sources is empty")
        for i, source in enumerate(self.data.sources):
            if source.weight <= 0:
                raise ConfigError(f"data.sources[{i}].weight must be > 0")
        if self.data.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError("data.val_fraction must be in [0, 1)")
        try:
            cache_mode(self.data.cache)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
        if self.train.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")
        if self.train.learning_rate <= 0:
            raise ConfigError("train.learning_rate must be > 0")
        if self.train.steps_per_epoch is not None and self.train.steps_per_epoch < 1:
            raise ConfigError(f"train.steps_per_epoch must be >= 1 (or null for one pass), got {self.train.steps_per_epoch}")
        if self.train.time_budget_minutes is not None and self.train.time_budget_minutes <= 0:
            raise ConfigError(f"train.time_budget_minutes must be > 0 (or null), got {self.train.time_budget_minutes}")
        if self.train.cluster_wait_minutes is not None and self.train.cluster_wait_minutes <= 0:
            raise ConfigError(f"train.cluster_wait_minutes must be > 0 (or null), got {self.train.cluster_wait_minutes}")
        for key in ("weight_decay", "warmup_epochs", "early_stopping_patience", "mask_pretrain_epochs"):
            if getattr(self.train, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self.train, key)}")
        if self.train.warmup_epochs > self.train.epochs:
            raise ConfigError(
                f"train.warmup_epochs ({self.train.warmup_epochs:g}) exceeds train.epochs ({self.train.epochs}): "
                "the learning rate would never reach train.learning_rate"
            )
        for key, value in (("train.seed", self.train.seed), ("data.split_seed", self.data.split_seed)):
            if not 0 <= value < 2**32:
                raise ConfigError(f"{key} must be in 0..2**32-1, got {value}")
        if not self.train.output_dir:
            raise ConfigError("train.output_dir must not be empty")
        self._check_mask_schedule()
        _check_choice("train.optimizer", self.train.optimizer, ("adamw", "adam", "sgd"))
        _check_choice("train.strategy", self.train.strategy, ("default", "mirrored", "multi_worker"))
        _check_choice("train.mixed_precision", self.train.mixed_precision, ("auto", "on", "off"))
        from tfface.schema import SchemaError
        from tfface.schema import get_schema

        try:
            schema = get_schema(self.data.schema)
        except (SchemaError, OSError) as e:
            raise ConfigError(f"data.schema: {e}") from None
        unknown = sorted(
            set(self.model.loss_weights) - set(LOSS_FAMILIES) - set(schema.task_names)
        )
        if unknown:
            raise ConfigError(
                f"model.loss_weights has unknown keys {unknown}: use task names or {LOSS_FAMILIES}"
            )
        return self

    def _check_mask_schedule(self) -> None:
        """A frozen mask predictor must be pretrained first: frozen from the
        start it would pool under the masks of an untrained network."""
        predicts_masks = self.model.type == "mask_guided" and self.model.fusion != "global"
        if self.train.mask_pretrain_epochs > 0 and not predicts_masks:
            raise ConfigError(
                "train.mask_pretrain_epochs trains the mask predictor of a mask-guided model with fusion "
                f"'group' or 'group_global'; this model (type {self.model.type!r}, fusion {self.model.fusion!r}) has none"
            )
        if predicts_masks and not self.model.mask_trainable and self.train.mask_pretrain_epochs == 0:
            raise ConfigError(
                "model.mask_trainable: false freezes the mask predictor, which would then never be trained: "
                "set train.mask_pretrain_epochs > 0 (pretrain it, then freeze it: the paper's schedule) "
                "or keep mask_trainable true (trained jointly through model.mask_loss_weight)"
            )

    # --- (de)serialisation --------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ExperimentConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
        _check_keys("", raw, cls)
        data_raw = _section(raw, "data")
        _check_keys("data.", data_raw, DataConfig)
        listed = data_raw.pop("sources", None)
        if listed is None:  # not given (or left blank): the default
            listed = [{"path": "synthetic:2000"}]
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list):
            raise ConfigError(f"data.sources must be a list of folders or sources, got {type(listed).__name__}")
        sources = []
        for i, s in enumerate(listed):
            if isinstance(s, str):
                s = {"path": s}
            _check_keys(f"data.sources[{i}].", s, SourceConfig)
            if "path" not in s:
                raise ConfigError(f"data.sources[{i}] needs a 'path'")
            sources.append(SourceConfig(**s))
        model_raw = _section(raw, "model")
        if "preset" in model_raw:
            from tfface.presets import preset_values

            name = model_raw.pop("preset")
            if not isinstance(name, str):
                raise ConfigError(f"model.preset must be a preset name, got {name!r}")
            model_raw = preset_values(name, model_raw)
        _check_keys("model.", model_raw, ModelConfig)
        train_raw = _section(raw, "train")
        _check_keys("train.", train_raw, TrainConfig)
        try:
            config = cls(
                name=raw.get("name", "default"),
                data=DataConfig(sources=sources, **data_raw),
                model=ModelConfig(**model_raw),
                train=TrainConfig(**train_raw),
            )
        except TypeError as e:  # pragma: no cover - keys are checked above
            raise ConfigError(str(e)) from None
        return config.validate()

    @classmethod
    def load(cls, path) -> "ExperimentConfig":
        raw = read_structured_file(path, "config file")
        if raw is None:
            # Not "all defaults": those train 2,000 synthetic faces into runs/default.
            raise ConfigError(f"{path}: the config file is empty")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path) -> None:
        import yaml

        from tfface.atomic_files import write_atomic

        # Whole or not at all: a reader (another worker, a resumed run)
        # never sees half a file.
        write_atomic(path, yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))


# Folders of example files in the tfface repository; an installed wheel
# holds the package only.
EXAMPLE_FOLDERS = ("configs", "tuning")


def _example_folder_hint(path: Path) -> str:
    if path.is_absolute() or not path.parts or path.parts[0] not in EXAMPLE_FOLDERS:
        return ""
    return (
        f" (relative to the working directory {Path.cwd()}; the example {path.parts[0]}/ folder comes with a "
        "clone of the tfface repository, not with the installed package: run from the clone, or write your own)"
    )


def read_structured_file(path, what: str, error=None):
    """A YAML or JSON file (by suffix) as data; a missing file or a parse
    error is reported naming `what` and the path."""
    error = error or ConfigError
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a {what}: name the file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}{_example_folder_hint(path)}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a {what} (not UTF-8 text: byte {e.start} is {e.object[e.start:e.start + 1]!r})") from None
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        if kind == "JSON":
            return json.loads(text, object_pairs_hook=_mapping_without_repeats)
        return _load_yaml(text)
    except RepeatedKeyError as e:
        raise error(f"{path}: {e}") from None
    except Exception as e:
        # YAML's messages span lines (the line quoted, a caret under it).
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip() and line.strip() != "^")
        raise error(f"{path}: cannot parse, not valid {kind} ({reason})") from None


class RepeatedKeyError(ValueError):
    """A mapping that gives a key twice: YAML and JSON keep the last value
    silently, so a second `train:` section would drop the first."""


def _mapping_without_repeats(pairs):
    mapping = {}
    for key, value in pairs:
        if key in mapping:
            raise RepeatedKeyError(f"key {key!r} is given twice in one mapping")
        mapping[key] = value
    return mapping


def _load_yaml(text: str):
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())


@functools.lru_cache(maxsize=None)
def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping (built once)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge (<<) may give keys that this mapping then overrides
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise RepeatedKeyError(f"key {key!r} is given twice in one mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return loader.construct_mapping(node, deep=True)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def _plain(value):
    """Tuples to lists so YAML stays readable."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_keys(prefix: str, raw: dict, cls) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}")


def _section(raw: dict, name: str) -> dict:
    """A top-level section as a new dict; an empty one (`data:` with
    nothing under it) means all defaults."""
    section = raw.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name} must be a mapping, got {type(section).__name__}")
    return dict(section)


def _check_types(prefix: str, obj) -> None:
    """Every field of a config dataclass against its annotation, so a
    quoted number or a list where a number belongs is refused by name
    before it fails deep in training. Numbers become plain Python ints and
    floats (YAML, KerasTuner and numpy all hand over numbers)."""
    for field in dataclasses.fields(obj):
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "Any")
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        value = getattr(obj, field.name)
        key = prefix + field.name
        if value is None:
            if optional or kind == "Any":
                continue
            raise ConfigError(f"{key} must be set, got null")
        setattr(obj, field.name, _typed_value(key, kind, value))


def _check_finite(prefix: str, obj) -> None:
    """NaN and infinity pass every range check (`nan < 0` is false)."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{field.name} must be a finite number, got {value}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Annotation -> (accepts the value, makes it plain, what was wanted).
_FIELD_KINDS = {
    "int": (_is_int, int, "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), float, "a number"),
    "bool": (lambda v: isinstance(v, bool), bool, "true or false"),
    # Folders may come as pathlib paths.
    "str": (lambda v: isinstance(v, (str, os.PathLike)), os.fspath, "a string"),
    # Layer widths.
    "tuple": (
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(w) and w >= 1 for w in v),
        lambda v: tuple(int(w) for w in v),
        "a non-empty list of positive integers",
    ),
    "dict": (lambda v: isinstance(v, dict), dict, "a mapping"),
    "list": (lambda v: isinstance(v, list), list, "a list"),
}


def _typed_value(key: str, kind: str, value):
    if kind not in _FIELD_KINDS:
        return value  # Any: checked where it is used (e.g. the schema)
    accepts, plain, wanted = _FIELD_KINDS[kind]
    if not accepts(value):
        raise ConfigError(f"{key} must be {wanted}, got {value!r}")
    return plain(value)


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def model_config_from_dict(raw: dict) -> ModelConfig:
    _check_keys("model.", raw, ModelConfig)
    config = ModelConfig(**raw)
    config.validate()
    return config
