"""Schema presets, label encoding and typed experiment configs."""

import json

import numpy as np
import pytest

from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.config import ModelConfig
from tfface.schema import CELEBA_ATTRIBUTES
from tfface.schema import GROUPS
from tfface.schema import MISSING
from tfface.schema import SCHEMA_PRESETS
from tfface.schema import Schema
from tfface.schema import SchemaError
from tfface.schema import Task
from tfface.schema import age_to_group
from tfface.schema import get_schema

# --- schema presets ---------------------------------------------------------


def test_celeba_preset_has_the_40_attributes():
    schema = get_schema("celeba")
    assert len(schema) == 40
    assert schema.task_names == list(CELEBA_ATTRIBUTES)
    assert all(t.is_binary and "celeba" in t.sources for t in schema)
    assert {t.group for t in schema} == set(GROUPS)


def test_fused_preset_merges_gender_and_adds_age_and_race():
    schema = get_schema("fused")
    assert len(schema) == 42
    assert len(schema.binary_tasks) == 39 + 1  # 39 attributes + gender
    assert "Male" not in schema
    attributes = [n for n in schema.task_names if n not in ("age_group", "gender", "race")]
    assert attributes == [a for a in CELEBA_ATTRIBUTES if a != "Male"]
    assert set(schema["gender"].sources) == {"celeba", "utkface", "synthetic"}
    assert schema["gender"].sources["celeba"] == "Male"
    assert schema["age_group"].num_classes == 9 and not schema["age_group"].is_binary
    assert schema["race"].num_classes == 5 and set(schema["race"].sources) == {"utkface"}
    assert {t.name for t in schema.labelled_by("utkface")} == {"age_group", "gender", "race"}


def test_every_preset_round_trips_through_json(tmp_path):
    for name in SCHEMA_PRESETS:
        schema = get_schema(name)
        assert Schema.from_json(schema.to_json()) == schema
        path = tmp_path / f"{name}.json"
        schema.save(path)
        loaded = get_schema(str(path))
        assert loaded == schema and loaded.name == name
        assert loaded.task_names == schema.task_names


def test_schema_loads_from_yaml(tmp_path):
    import yaml

    schema = Schema([Task("a", threshold=0.3), Task("b", kind="multiclass", classes=("x", "y", "z"))])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(schema.to_dict()))
    assert Schema.load(path) == schema


def test_with_thresholds_replaces_only_named_tasks():
    schema = get_schema("utkface").with_thresholds({"gender": 0.4})
    assert schema["gender"].threshold == 0.4 and schema["race"].threshold == 0.5
    with pytest.raises(SchemaError, match="not_a_task"):
        schema.with_thresholds({"not_a_task": 0.2})


# --- label encoding -----------------------------------------------------------


def test_age_bins_are_fairface_groups():
    ages = np.array([0, 2, 3, 9, 10, 19, 20, 69, 70, 110, -1])
    np.testing.assert_array_equal(age_to_group(ages), [0, 0, 1, 1, 2, 2, 3, 7, 8, 8, -1])


def test_encode_labels_masks_unlabelled_tasks_and_bins_ages():
    schema = get_schema("fused")
    columns = {
        "age": np.array([2, 3, 69, 70, -1]),
        "male": np.array([1, 0, 1, 0, 1]),
        "race": np.array([0, 4, 2, -1, 1]),
    }
    labels = schema.encode_labels("utkface", columns, 5)
    assert sorted(labels) == sorted(schema.task_names)
    np.testing.assert_array_equal(labels["age_group"], [0, 1, 7, 8, MISSING])
    assert labels["age_group"].dtype == np.int32
    np.testing.assert_array_equal(labels["gender"], [1, 0, 1, 0, 1])
    assert labels["gender"].dtype == np.float32
    np.testing.assert_array_equal(labels["race"], [0, 4, 2, -1, 1])
    for name in ("Smiling", "Eyeglasses", "Young"):
        np.testing.assert_array_equal(labels[name], np.full(5, MISSING, np.float32))


def test_encode_labels_for_celeba_fills_gender_from_male():
    schema = get_schema("fused")
    columns = {a: np.array([1, 0, 1]) for a in CELEBA_ATTRIBUTES}
    columns["Male"] = np.array([0, 1, 1])
    labels = schema.encode_labels("celeba", columns, 3)
    np.testing.assert_array_equal(labels["gender"], [0, 1, 1])
    np.testing.assert_array_equal(labels["Smiling"], [1, 0, 1])
    np.testing.assert_array_equal(labels["age_group"], np.full(3, MISSING))
    np.testing.assert_array_equal(labels["race"], np.full(3, MISSING))


def test_encode_labels_refuses_out_of_range_values():
    with pytest.raises(SchemaError, match="'race'.*'race'.*utkface.*0..4"):
        get_schema("fused").encode_labels("utkface", {"race": np.array([0, 7])}, 2)


# --- bad schemas ------------------------------------------------------------------


@pytest.mark.parametrize(
    "tasks, message",
    [
        ([], "at least one task"),
        ([{"name": "a"}, {"name": "a"}], r"duplicate task names.*\['a'\]"),
        ([{"name": "a", "kind": "ordinal"}], "'a'.*kind.*'ordinal'"),
        ([{"name": "a", "classes": ["x", "y", "z"]}], "'a'.*exactly 2 class names"),
        ([{"name": "a", "kind": "multiclass", "classes": ["x"]}], "'a'.*at least 2 classes"),
        ([{"name": "a", "group": "chin"}], "'a'.*group.*'chin'"),
        ([{"name": "a", "sources": {"imdb": "x"}}], "'a'.*unknown source format 'imdb'"),
        ([{"name": "a", "threshold": 1.5}], "'a'.*threshold.*1.5"),
        ([{"name": "a", "colour": "red"}], r"#0 \('a'\).*unknown fields \['colour'\]"),
        (["a"], "#0 must be a mapping"),
        ([{"name": ""}], "non-empty string"),
        ([{"name": "a", "classes": "ab"}], "'a'.*classes must be a list"),
        ([{"name": "a", "kind": "multiclass", "classes": ["x", "y", "x"]}], "'a'.*class names repeat"),
        ([{"name": "a", "sources": ["celeba"]}], "'a'.*sources must map"),
    ],
)
def test_bad_schema_values_raise_schema_error(tasks, message):
    with pytest.raises(SchemaError, match=message):
        Schema.from_dict({"tasks": tasks})


def test_bad_schema_files_raise_schema_error_naming_the_file(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"tasks": [')
    with pytest.raises(SchemaError, match="broken.json.*not valid JSON"):
        Schema.load(bad_json)
    no_tasks = tmp_path / "empty.json"
    no_tasks.write_text(json.dumps({"name": "x"}))
    with pytest.raises(SchemaError, match="top-level 'tasks'"):
        Schema.load(no_tasks)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Schema.load(tmp_path / "missing.json")
    with pytest.raises(SchemaError, match="unknown schema 'nope'"):
        get_schema("nope")
    with pytest.raises(KeyError, match="no task 'nope'"):
        get_schema("celeba")["nope"]


def test_schema_task_without_name_raises_schema_error():
    with pytest.raises(SchemaError, match="name"):
        Schema.from_dict({"tasks": [{"kind": "binary"}]})


def test_schema_non_numeric_threshold_names_the_task():
    with pytest.raises(SchemaError, match="'a'.*threshold"):
        Schema.from_dict({"tasks": [{"name": "a", "threshold": "high"}]})


# --- experiment config --------------------------------------------------------------


def test_default_experiment_config_is_valid():
    config = ExperimentConfig.from_dict({})
    assert config.model.image_size == config.data.image_size
    assert config.data.sources[0].path.startswith("synthetic")


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"modle": {}}, "modle"),
        ({"model": {"gatee": "static"}}, "model.gatee"),
        ({"data": {"batchsize": 8}}, "data.batchsize"),
        ({"train": {"lr": 0.1}}, "train.lr"),
        ({"data": {"sources": [{"path": "synthetic:10", "wieght": 2}]}}, r"data.sources\[0\].wieght"),
    ],
)
def test_unknown_config_keys_are_refused_by_name(raw, key):
    with pytest.raises(ConfigError, match=f"unknown config key.*{key}"):
        ExperimentConfig.from_dict(raw)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"gate": "sometimes"}}, "model.gate.*'sometimes'"),
        ({"model": {"backbone": "vgg16"}}, "model.backbone.*'vgg16'"),
        ({"model": {"fusion": "concat"}}, "model.fusion"),
        ({"model": {"correlation_init": "phi"}}, "model.correlation_init.*'phi'"),
        ({"train": {"optimizer": "lion"}}, "train.optimizer.*'lion'"),
        ({"train": {"strategy": "tpu"}}, "train.strategy"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
        ({"model": {"image_size": 40}, "data": {"image_size": 40}}, "multiple of 16"),
        ({"data": {"sources": [{"path": "synthetic:10", "weight": 0}]}}, r"data.sources\[0\].weight"),
        ({"model": {"loss_weights": {"smiling": 1.0}}}, r"loss_weights.*\['smiling'\]"),
        ({"model": {"loss_weights": {"gender": -1}}}, "loss_weights.gender"),
        # Values of the wrong type are refused by name before any work.
        ({"train": {"epochs": "5"}}, "train.epochs must be an integer, got '5'"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
        ({"model": {"backbone_widths": 32}}, "model.backbone_widths must be a non-empty list"),
        ({"model": {"loss_weights": [1, 2]}}, "model.loss_weights must be a mapping"),
        ({"model": {"embedding_dim": None}}, "model.embedding_dim must be set"),
        ({"model": {"correlation": "no"}}, "model.correlation must be true or false"),
        ({"model": {"loss_weights": {"gender": True}}}, "loss_weights.gender"),
        ({"data": {"sources": [{"path": "synthetic:10", "weight": "a"}]}}, r"data.sources\[0\].weight must be a number"),
        ({"data": {"sources": {"path": "x"}}}, "data.sources must be a list"),
        ({"model": [1]}, "model must be a mapping"),
        ({"train": {"steps_per_epoch": -1}}, "train.steps_per_epoch"),
        ({"train": {"weight_decay": -1e-4}}, "train.weight_decay"),
        ({"train": {"early_stopping_patience": -2}}, "train.early_stopping_patience"),
        ({"train": {"time_budget_minutes": 0}}, "train.time_budget_minutes"),
        ({"train": {"cluster_wait_minutes": -1}}, r"train.cluster_wait_minutes must be > 0 \(or null\)"),
        ({"train": {"cluster_wait_minutes": "10"}}, "train.cluster_wait_minutes"),
        # NaN and infinity pass every `< 0` check; refused by name instead.
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate must be a finite number"),
        ({"train": {"warmup_epochs": float("inf")}}, "train.warmup_epochs must be a finite number"),
        ({"train": {"epochs": 3, "warmup_epochs": 1e300}}, r"train.warmup_epochs \(1e\+300\) exceeds train.epochs \(3\)"),
        ({"train": {"time_budget_minutes": float("nan")}}, "train.time_budget_minutes must be a finite number"),
        ({"data": {"sources": [{"path": "synthetic:10", "weight": float("inf")}]}}, r"data.sources\[0\].weight must be a finite"),
        ({"model": {"loss_weights": {"gender": float("nan")}}}, "loss_weights.gender must be a finite number"),
        ({"train": {"seed": -1}}, r"train.seed must be in 0..2\*\*32-1"),
        ({"data": {"split_seed": -5}}, "data.split_seed must be in"),
        # Shapes the network cannot be built with, refused before config.yaml is written.
        ({"model": {"backbone_widths": [8, 16, 32]}}, "model.backbone_widths must be 4 positive stage widths"),
        ({"model": {"type": "mask_guided", "mask_channels": [8]}}, "model.mask_channels must be >= 2"),
        ({"model": {"backbone_weights": "w.h5"}}, "model.backbone_weights: small_cnn has no pretrained weights"),
        # An empty list is not "the default sources" (2,000 synthetic faces).
        ({"data": {"sources": []}}, "data.sources is empty"),
        ({"data": {"schema": "nosuch"}}, "data.schema: unknown schema 'nosuch'"),
        ({"data": {"schema": "missing.yaml"}}, "data.schema: schema file not found"),
    ],
)
def test_bad_config_values_are_refused_by_name(raw, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(raw)


def test_image_size_mismatch_is_refused():
    with pytest.raises(ConfigError, match=r"data.image_size \(32\).*model.image_size \(64\)"):
        ExperimentConfig.from_dict({"data": {"image_size": 32}, "model": {"image_size": 64}})


def test_config_yaml_round_trip(tmp_path):
    raw = {
        "name": "tiny",
        "data": {
            "sources": ["synthetic:64", {"path": "celeba_sample", "weight": 2.0}],
            "schema": "fused",
            "image_size": 32,
            "batch_size": 8,
        },
        "model": {
            "image_size": 32,
            "backbone_widths": [8, 16, 32, 64],
            "gate": "input_conditioned",
            "loss_weights": {"gender": 2.0, "Smiling": 0.5},
        },
        "train": {"epochs": 2, "optimizer": "sgd"},
    }
    config = ExperimentConfig.from_dict(raw)
    assert config.model.backbone_widths == (8, 16, 32, 64)
    assert config.data.sources[1].weight == 2.0
    path = tmp_path / "tiny.yaml"
    config.save(path)
    loaded = ExperimentConfig.load(path)
    assert loaded == config
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "name, content, error, message",
    [
        ("bad.yaml", "model:\n  gate: [unclosed\n", ConfigError, "bad.yaml.*cannot parse"),
        ("binary.yaml", b"\xff\xfe\x00", ConfigError, r"binary.yaml: not a config file \(not UTF-8 text"),
        ("listed.yaml", "data:\n  schema: [1, 2]\n", ValueError, r"a schema is a preset name .* got \[1, 2\]"),
        ("wrong.yaml", "model:\n  gate: sometimes\n", ConfigError, "wrong.yaml.*model.gate"),
        ("empty.yaml", "# nothing yet\n", ConfigError, "empty.yaml: the config file is empty"),
        # YAML and JSON keep the last of two values silently: the first train: section would be lost.
        (
            "twice.yaml", "train: {epochs: 1}\ndata: {schema: synthetic}\ntrain:\n  epochs: 3\n", ConfigError,
            r"twice.yaml: key 'train' is given twice in one mapping \(line 3\)",
        ),
        ("nested.json", '{"train": {"epochs": 1, "epochs": 2}}', ConfigError, "nested.json: key 'epochs' is given twice"),
    ],
)
def test_config_files_with_problems_name_the_file(tmp_path, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error, match=message) as raised:
        ExperimentConfig.load(path)
    assert "\n" not in str(raised.value)  # YAML's quoted line and caret folded into one line
    with pytest.raises(FileNotFoundError, match="nothing.yaml"):
        ExperimentConfig.load(tmp_path / "nothing.yaml")


def test_merge_keys_and_unquoted_on_off_mean_what_yaml_users_expect(tmp_path):
    # A merge key's values may be overridden: that is no repeat.
    merged = tmp_path / "merged.yaml"
    merged.write_text("defaults: &d {epochs: 1, seed: 3}\ntrain:\n  <<: *d\n  epochs: 2\n")
    from tfface.config import read_structured_file

    assert read_structured_file(merged, "config")["train"] == {"epochs": 2, "seed": 3}
    # The documented values, written unquoted, are YAML booleans.
    for written, meant in (("off", "off"), ("on", "on"), ("auto", "auto")):
        path = tmp_path / f"{written}.yaml"
        path.write_text(f"train:\n  mixed_precision: {written}\n")
        assert ExperimentConfig.load(path).train.mixed_precision == meant


def test_empty_sections_and_a_single_source_string_mean_the_obvious():
    config = ExperimentConfig.from_dict({"data": {"sources": "synthetic:10", "schema": "synthetic"}, "model": None})
    assert [s.path for s in config.data.sources] == ["synthetic:10"]
    assert config.model == ModelConfig()


def test_numpy_numbers_become_plain_and_the_config_saves(tmp_path):
    import numpy as np

    config = ExperimentConfig.from_dict({"data": {"sources": ["synthetic:10"], "schema": "synthetic"}})
    config.model.loss_weights = {"gender": np.float32(0.5)}
    config.train.epochs = np.int64(3)
    config.validate().save(tmp_path / "c.yaml")
    loaded = ExperimentConfig.load(tmp_path / "c.yaml")
    assert loaded.model.loss_weights == {"gender": 0.5} and loaded.train.epochs == 3


def test_model_config_validate_normalises_sequences():
    config = ModelConfig(backbone_widths=[8, 16, 32, 64], mask_channels=[4, 8, 16])
    config.validate()
    assert config.backbone_widths == (8, 16, 32, 64) and config.mask_channels == (4, 8, 16)
