"""Attribute schema: the one description of every output a model predicts.

A `Schema` is a list of `Task`s. Each task says what kind of output it is,
which face-part group it belongs to (the eight MGMTN groups), which data
source formats label it and under which column, and its decision threshold.
The schema travels with every model (`.keras` config) and every export
(SavedModel assets), so predictions always come back with names.

Labels are encoded per task as one array per batch: binary tasks as float32
in {0, 1}, multiclass tasks as int32 class indices, and **-1 for missing**.
Losses and metrics mask every entry that is -1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

MISSING = -1

BINARY = "binary"
MULTICLASS = "multiclass"
KINDS = (BINARY, MULTICLASS)

# The eight face-part groups of MGMTN (docs/design.md); "whole_face" is the
# paper's "Object" group.
GROUPS = (
    "eyes",
    "nose",
    "mouth",
    "cheeks",
    "ears",
    "lower_face",
    "hair",
    "whole_face",
)

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

# docs/design.md (our assignment: the paper's own table was not retrievable).
CELEBA_GROUPS = {
    "eyes": (
        "Arched_Eyebrows",
        "Bags_Under_Eyes",
        "Bushy_Eyebrows",
        "Eyeglasses",
        "Narrow_Eyes",
    ),
    "nose": ("Big_Nose", "Pointy_Nose"),
    "mouth": (
        "Big_Lips",
        "Mouth_Slightly_Open",
        "Smiling",
        "Wearing_Lipstick",
        "Mustache",
    ),
    "cheeks": ("High_Cheekbones", "Rosy_Cheeks"),
    "ears": ("Wearing_Earrings", "Sideburns"),
    "lower_face": (
        "5_o_Clock_Shadow",
        "Double_Chin",
        "Goatee",
        "No_Beard",
        "Wearing_Necklace",
        "Wearing_Necktie",
    ),
    "hair": (
        "Bald",
        "Bangs",
        "Black_Hair",
        "Blond_Hair",
        "Brown_Hair",
        "Gray_Hair",
        "Receding_Hairline",
        "Straight_Hair",
        "Wavy_Hair",
        "Wearing_Hat",
    ),
    "whole_face": (
        "Attractive",
        "Blurry",
        "Chubby",
        "Heavy_Makeup",
        "Male",
        "Oval_Face",
        "Pale_Skin",
        "Young",
    ),
}
CELEBA_ATTRIBUTE_GROUP = {
    attr: group for group, attrs in CELEBA_GROUPS.items() for attr in attrs
}

# FairFace's nine age bins (lower bound inclusive).
AGE_GROUPS = (
    "0-2",
    "3-9",
    "10-19",
    "20-29",
    "30-39",
    "40-49",
    "50-59",
    "60-69",
    "70+",
)
AGE_GROUP_LOWER_BOUNDS = (0, 3, 10, 20, 30, 40, 50, 60, 70)
RACES = ("White", "Black", "Asian", "Indian", "Others")

# Source formats. Each reader yields raw label columns named as below.
CELEBA = "celeba"
UTKFACE = "utkface"
SYNTHETIC = "synthetic"
SOURCE_FORMATS = (CELEBA, UTKFACE, SYNTHETIC)

# CelebA-named attributes the synthetic generator draws with visual
# correlates (it labels exactly these, plus `age` and `Male`).
SYNTHETIC_ATTRIBUTES = (
    "Eyeglasses",
    "Smiling",
    "Mouth_Slightly_Open",
    "Black_Hair",
    "Blond_Hair",
    "Brown_Hair",
    "Gray_Hair",
    "Bangs",
    "Bald",
    "Wearing_Hat",
    "No_Beard",
    "Goatee",
    "Mustache",
    "Wearing_Lipstick",
    "Male",
    "Pale_Skin",
    "Young",
    "Rosy_Cheeks",
    "Wearing_Earrings",
    "Wearing_Necktie",
)


def age_to_group(age: np.ndarray) -> np.ndarray:
    """Maps ages in years to FairFace bin indices; negative ages stay -1."""
    age = np.asarray(age)
    groups = np.searchsorted(AGE_GROUP_LOWER_BOUNDS, age, side="right") - 1
    return np.where(age < 0, MISSING, groups).astype(np.int32)


class SchemaError(ValueError):
    """A schema or schema file that cannot describe a model's outputs."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One predicted output.

    Args:
        name: output name, unique in its schema; also the model output key.
        kind: "binary" or "multiclass".
        classes: class names; for binary tasks (negative, positive).
        group: one of `GROUPS`; MGMTN reads this task from that group.
        sources: source format -> raw label column that labels this task.
            Columns named "age" are binned with `age_to_group`.
        threshold: decision threshold on the positive probability (binary
            tasks only), calibrated by `tfface.evaluation.calibration`.
    """

    name: str
    kind: str = BINARY
    classes: tuple[str, ...] = ("no", "yes")
    group: str = "whole_face"
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    threshold: float = 0.5

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise SchemaError(f"task name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.classes, (list, tuple)) or not all(isinstance(c, str) and c for c in self.classes):
            raise SchemaError(f"task {self.name!r}: classes must be a list of class names, got {self.classes!r}")
        if len(set(self.classes)) != len(self.classes):
            raise SchemaError(f"task {self.name!r}: class names repeat: {list(self.classes)}")
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.kind == BINARY and len(self.classes) != 2:
            raise SchemaError(f"task {self.name!r}: a binary task has exactly 2 class names, got {len(self.classes)}")
        if self.kind == MULTICLASS and len(self.classes) < 2:
            raise SchemaError(f"task {self.name!r}: a multiclass task needs at least 2 classes")
        if self.group not in GROUPS:
            raise SchemaError(f"task {self.name!r}: group must be one of {GROUPS}, got {self.group!r}")
        if not isinstance(self.sources, dict) or not all(isinstance(c, str) for c in self.sources.values()):
            raise SchemaError(
                f"task {self.name!r}: sources must map a source format to its label column, got {self.sources!r}"
            )
        for source in self.sources:
            if source not in SOURCE_FORMATS:
                raise SchemaError(f"task {self.name!r}: unknown source format {source!r} (known: {SOURCE_FORMATS})")
        try:
            threshold = float(self.threshold)
        except (TypeError, ValueError):
            raise SchemaError(f"task {self.name!r}: threshold must be a number, got {self.threshold!r}") from None
        if not 0.0 < threshold < 1.0:
            raise SchemaError(f"task {self.name!r}: threshold must be in (0, 1), got {self.threshold}")
        object.__setattr__(self, "sources", dict(self.sources))
        object.__setattr__(self, "threshold", float(self.threshold))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_binary(self) -> bool:
        return self.kind == BINARY

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "classes": list(self.classes),
            "group": self.group,
            "sources": dict(self.sources),
            "threshold": self.threshold,
        }


class Schema:
    """An ordered list of tasks; see the module docstring."""

    def __init__(self, tasks, name: str = "custom"):
        self.tasks = tuple(t if isinstance(t, Task) else Task(**t) for t in tasks)
        self.name = name
        if not self.tasks:
            raise SchemaError("a schema needs at least one task")
        names = [t.name for t in self.tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(f"duplicate task names in schema: {duplicates}")
        self._by_name = {t.name: t for t in self.tasks}

    # --- access -----------------------------------------------------------
    def __len__(self):
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, name: str) -> Task:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no task {name!r} in schema {self.name!r}; tasks: {self.task_names}") from None

    def __contains__(self, name):
        return name in self._by_name

    def __eq__(self, other):
        return isinstance(other, Schema) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"Schema(name={self.name!r}, tasks={len(self)})"

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def binary_tasks(self) -> list[Task]:
        return [t for t in self.tasks if t.is_binary]

    @property
    def multiclass_tasks(self) -> list[Task]:
        return [t for t in self.tasks if not t.is_binary]

    def labelled_by(self, source_format: str) -> list[Task]:
        return [t for t in self.tasks if source_format in t.sources]

    def with_thresholds(self, thresholds: dict[str, float]) -> "Schema":
        unknown = sorted(set(thresholds) - set(self._by_name))
        if unknown:
            raise SchemaError(f"thresholds given for tasks not in the schema: {unknown}")
        tasks = [
            dataclasses.replace(t, threshold=thresholds.get(t.name, t.threshold))
            for t in self.tasks
        ]
        return Schema(tasks, name=self.name)

    # --- labels -----------------------------------------------------------
    def encode_labels(self, source_format: str, columns: dict[str, np.ndarray], num_examples: int) -> dict[str, np.ndarray]:
        """Raw label columns of one source -> per-task arrays with -1 for missing."""
        labels = {}
        for task in self.tasks:
            dtype = np.float32 if task.is_binary else np.int32
            column = task.sources.get(source_format)
            if column is None or column not in columns:
                labels[task.name] = np.full((num_examples,), MISSING, dtype)
                continue
            values = np.asarray(columns[column])
            if column == "age":
                values = age_to_group(values)
            values = values.astype(dtype)
            valid = values != MISSING
            if valid.any() and (values[valid].min() < 0 or values[valid].max() >= task.num_classes):
                raise SchemaError(
                    f"task {task.name!r}: column {column!r} of {source_format} data has values "
                    f"outside 0..{task.num_classes - 1}"
                )
            labels[task.name] = values
        return labels

    # --- serialization -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": [t.to_dict() for t in self.tasks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Schema":
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list) or not data["tasks"]:
            raise SchemaError("a schema file needs a top-level 'tasks' list with at least one task")
        tasks = []
        for i, raw in enumerate(data["tasks"]):
            if not isinstance(raw, dict):
                raise SchemaError(f"schema task #{i} must be a mapping, got {type(raw).__name__}")
            unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(Task)})
            if unknown:
                raise SchemaError(f"schema task #{i} ({raw.get('name')!r}) has unknown fields {unknown}")
            if "name" not in raw:
                raise SchemaError(f"schema task #{i} has no 'name'")
            tasks.append(Task(**raw))
        return cls(tasks, name=data.get("name", "custom"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Schema":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> "Schema":
        from tfface.config import read_structured_file

        return cls.from_dict(read_structured_file(path, "schema file", error=SchemaError))


# --- presets ------------------------------------------------------------------


def _celeba_task(attr: str, extra_sources=()) -> Task:
    sources = {CELEBA: attr}
    for source in extra_sources:
        sources[source] = attr
    return Task(name=attr, group=CELEBA_ATTRIBUTE_GROUP[attr], sources=sources)


def _gender_task() -> Task:
    return Task(
        name="gender",
        classes=("female", "male"),
        group="whole_face",
        sources={CELEBA: "Male", UTKFACE: "male", SYNTHETIC: "Male"},
    )


def _age_task() -> Task:
    return Task(
        name="age_group",
        kind=MULTICLASS,
        classes=AGE_GROUPS,
        group="whole_face",
        # Real CelebA has no age column; synthetic folders written in
        # CelebA format do.
        sources={UTKFACE: "age", SYNTHETIC: "age", CELEBA: "age"},
    )


def _race_task() -> Task:
    return Task(
        name="race",
        kind=MULTICLASS,
        classes=RACES,
        group="whole_face",
        sources={UTKFACE: "race"},
    )


def celeba_schema() -> Schema:
    """The 40 CelebA attributes (synthetic data labels its subset)."""
    return Schema(
        [
            _celeba_task(a, [SYNTHETIC] if a in SYNTHETIC_ATTRIBUTES else [])
            for a in CELEBA_ATTRIBUTES
        ],
        name="celeba",
    )


def utkface_schema() -> Schema:
    return Schema([_age_task(), _gender_task(), _race_task()], name="utkface")


def fused_schema() -> Schema:
    """CelebA's 39 non-gender attributes + age group, gender and race.

    CelebA's `Male` and UTKFace's gender are one task, `gender`.
    """
    tasks = [
        _celeba_task(a, [SYNTHETIC] if a in SYNTHETIC_ATTRIBUTES else [])
        for a in CELEBA_ATTRIBUTES
        if a != "Male"
    ]
    return Schema(tasks + [_age_task(), _gender_task(), _race_task()], name="fused")


def synthetic_schema() -> Schema:
    """Exactly the tasks the synthetic generator labels."""
    tasks = [
        _celeba_task(a, [SYNTHETIC])
        for a in SYNTHETIC_ATTRIBUTES
        if a != "Male"
    ]
    return Schema(tasks + [_age_task(), _gender_task()], name="synthetic")


SCHEMA_PRESETS = {
    "celeba": celeba_schema,
    "utkface": utkface_schema,
    "fused": fused_schema,
    "synthetic": synthetic_schema,
}


def get_schema(name_or_path) -> Schema:
    """A preset name ("celeba", "utkface", "fused", "synthetic") or a file."""
    if isinstance(name_or_path, Schema):
        return name_or_path
    if isinstance(name_or_path, dict):
        return Schema.from_dict(name_or_path)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise SchemaError(
            f"a schema is a preset name ({', '.join(sorted(SCHEMA_PRESETS))}), a .json/.yaml file or a mapping, "
            f"got {name_or_path!r}"
        )
    if name_or_path in SCHEMA_PRESETS:
        return SCHEMA_PRESETS[name_or_path]()
    path = Path(str(name_or_path))
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        return Schema.load(path)
    raise SchemaError(
        f"unknown schema {name_or_path!r}: use one of {sorted(SCHEMA_PRESETS)} or a .json/.yaml file"
    )
