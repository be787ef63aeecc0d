"""KerasTuner search (tfface.tuning): search-space files, a search and its
results, resume, refused configs, failing trials, distributed chief + workers.

Tiny throughout: synthetic:200 at 32 px, backbone (8, 16, 32, 64),
embedding 16, one epoch per trial, and a four-task schema so a trial's
graph traces fast.
"""

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pytest
import yaml

from harness import small_disk

from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.data.sources import open_source
from tfface.data.splits import split_record
from tfface.schema import get_schema
from tfface.training.trainer import training_labels
# run_search looks up load_search_data, make_tuner and wait_for_chief in
# search_module: patch them there.
from tfface.tuning import search as search_module
from tfface.tuning import search_data as data_module
from tfface.tuning import search_record as record_module
from tfface.tuning import tuners as tuners_module
from tfface.tuning.hypermodels import FaceHyperModel
from tfface.tuning.hypermodels import hypermodel_for
from tfface.tuning.search import TuningError
from tfface.tuning.search import make_tuner
from tfface.tuning.search import run_search
from tfface.tuning.search import TuningConfig
from tfface.tuning.search_space import SearchSpace

REPO = Path(__file__).resolve().parents[1]
SPACES = {
    "gated": REPO / "tuning" / "gated_search_space.yaml",
    "mask_guided": REPO / "tuning" / "mask_guided_search_space.yaml",
}
AGE_GROUPS = ["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"]
TINY_SCHEMA = {
    "name": "tiny",
    "tasks": [
        {"name": "Smiling", "kind": "binary", "group": "mouth", "sources": {"synthetic": "Smiling"}},
        {"name": "Eyeglasses", "kind": "binary", "group": "eyes", "sources": {"synthetic": "Eyeglasses"}},
        {"name": "age_group", "kind": "multiclass", "classes": AGE_GROUPS, "sources": {"synthetic": "age"}},
        {"name": "gender", "kind": "binary", "classes": ["female", "male"], "sources": {"synthetic": "Male"}},
    ],
}


def tiny_experiment(model_type="gated", schema=TINY_SCHEMA):
    return {
        "name": "tiny",
        "data": {"sources": ["synthetic:200"], "schema": schema, "image_size": 32, "batch_size": 32,
                 "val_fraction": 0.2},
        "model": {"type": model_type, "image_size": 32, "backbone_widths": [8, 16, 32, 64], "embedding_dim": 16,
                  "mask_channels": [4, 8, 16]},
        "train": {"epochs": 1, "output_dir": "unused"},
    }


def write_tuning(folder: Path, name="search.yaml", **overrides) -> Path:
    config = {
        "project": "search",
        "tuner": "random",
        "max_trials": 2,
        "epochs": 1,
        "seed": 3,
        "search_space": str(SPACES["gated"]),
        "experiment": tiny_experiment(),
    }
    config.update(overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def subprocess_env(**extra) -> dict:
    """The environment of a `tfface` subprocess: this checkout first on the
    path, TensorFlow's start-up lines quiet."""
    return dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    )


# --- search-space files ----------------------------------------------------------------


def _sample(space, forced, seed):
    """Random values for every active hyperparameter, `forced` ones fixed."""
    hp = kt.HyperParameters()
    space.declare(hp)
    for i, p in enumerate(hp.space):
        if hp.is_active(p):
            hp.values[p.name] = forced.get(p.name, p.random_sample(seed + i))
    return hp


@pytest.mark.parametrize("model_type,switch", [("gated", "gate"), ("mask_guided", "fusion")])
def test_shipped_search_space_builds_a_model_for_sampled_values(model_type, switch):
    base = ExperimentConfig.from_dict(tiny_experiment(model_type, schema="synthetic"))
    space = SearchSpace.load(SPACES[model_type]).check(base)
    wanted = {"loss_weights.attributes", "loss_weights.age_group", "loss_weights.gender", "dropout", "learning_rate"}
    wanted |= {"gate", "gate_init", "gate_bottleneck", "center_loss_weight", "center_update_rate"} if model_type == "gated" else {
        "mask_loss_weight", "fusion"}
    assert wanted <= set(space.names)
    assert "loss_weights.race" not in space.names  # the synthetic schema has no race task
    labels = training_labels(get_schema(base.data.schema), [open_source("synthetic:200", image_size=32)])
    if model_type == "gated":
        # The space samples label_correlation starts, which need the training labels.
        with pytest.raises(ConfigError, match="trials may start the correlation layer from the training labels"):
            hypermodel_for(base, space, steps_per_epoch=4, schedule_epochs=1)
    hypermodel = hypermodel_for(base, space, steps_per_epoch=4, schedule_epochs=1, train_labels=labels)
    choices = {
        "gated": ["none", "static", "input_conditioned", "mixture_of_experts"],
        "mask_guided": ["group_global", "group", "global"],
    }
    for seed, value in enumerate(choices[model_type]):
        hp = _sample(space, {switch: value, "correlation_init": "identity"}, seed)
        config = hypermodel.trial_config(hp)
        model = hypermodel.build(hp)
        assert getattr(model.model_config, switch) == value
        if model_type == "gated" and value in ("static", "input_conditioned"):
            assert model.model_config.gate_bottleneck == hp.values["gate_bottleneck"]
        if value == "mixture_of_experts":
            assert model.get_layer("expert_routing").num_experts == hp.values["num_experts"]
        assert model.model_config.dropout == pytest.approx(hp.values["dropout"])
        assert model.model_config.loss_weights["gender"] == pytest.approx(hp.values["loss_weights.gender"])
        assert config.train.learning_rate == pytest.approx(hp.values["learning_rate"])
        assert set(base.model.loss_weights) == set()  # the base config is never modified
        assert "Smiling" in model.output_names or "Smiling" in model.output
        if model_type == "gated":
            hp.values.update(correlation=True, correlation_init="label_correlation")
            started = hypermodel.build(hp)
            assert np.abs(keras.ops.convert_to_numpy(started.get_layer("correlation").correlation)).max() > 0.005
        # The trial config round-trips as an experiment config.
        again = ExperimentConfig.from_dict(config.to_dict())
        assert getattr(again.model, switch) == value


_REBUILD_FRESH = """
import json, sys
import numpy as np
from tfface.config import model_config_from_dict
from tfface.models.build import build_model
for raw in json.loads(sys.argv[1]):
    model = build_model("synthetic", model_config_from_dict(raw))
    model.build_from_config({"input_shape": None})  # what build_config.json holds
    out = model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0)
    print("REBUILT", raw["type"], sorted(out)[:1])
"""


def test_a_hyperband_continuation_rebuilds_a_fresh_trial_model_from_its_build_config():
    # Hyperband's continuation calls build_from_config with the parent's
    # saved build config before loading its weights. In a process that had
    # run no model yet (a resumed search) Keras's own version raised
    # "Undefined shapes are not supported" and the trial failed; hence a
    # fresh process.
    configs = [tiny_experiment(t)["model"] for t in ("gated", "mask_guided")]
    done = subprocess.run(
        [sys.executable, "-c", _REBUILD_FRESH, json.dumps(configs)],
        env=subprocess_env(),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("REBUILT")] == [
        "gated", "mask_guided"
    ]


def test_conditional_hyperparameters_follow_their_parent():
    base = ExperimentConfig.from_dict(tiny_experiment())
    space = SearchSpace.load(SPACES["gated"]).check(base)
    off = _sample(space, {"gate": "none"}, 0)
    assert not off.is_active("gate_init") and not off.is_active("gate_hidden")
    on = _sample(space, {"gate": "input_conditioned"}, 0)
    assert on.is_active("gate_init") and on.is_active("gate_hidden")
    values = space.declare(on)
    assert values["gate_hidden"] in (32, 64, 128)
    assert not on.is_active("num_experts")
    experts = _sample(space, {"gate": "mixture_of_experts"}, 0)
    assert experts.is_active("num_experts") and not experts.is_active("gate_init")


# --- refused configs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "space,overrides,message",
    [
        ({"gait": {"type": "choice", "values": ["none"]}}, {}, r"unknown hyperparameter 'gait'"),
        ({"dropout": {"type": "float", "min": 0.3, "max": 0.3}}, {}, r"'dropout': empty range"),
        ({"gate": {"type": "choice", "values": []}}, {}, r"'gate': choice needs a non-empty"),
        ({"gate": {"type": "float", "min": 0, "max": 1}}, {}, r"'gate': type float does not fit"),
        ({"dropout": {"type": "uniform", "min": 0, "max": 1}}, {}, r"'dropout': type must be one of"),
        ({"dropout": {"type": "float", "min": 0.0, "max": 1.5}}, {}, r"'dropout': value 1.5 is refused"),
        ({"learning_rate": {"type": "float", "min": 0, "max": 0.1, "sampling": "log"}}, {}, r"needs min > 0"),
        ({"mask_loss_weight": {"type": "float", "min": 0.1, "max": 1}}, {}, r"'mask_loss_weight' has no effect"),
        ({"loss_weights.hair": {"type": "float", "min": 0.1, "max": 1}}, {}, r"'hair' is neither"),
        ({"gate_init": {"type": "float", "min": 0, "max": 1, "when": {"gate": "static"}}}, {}, r"declared above"),
        ({"dropout": {"type": "float", "min": 0, "max": 0.5}}, {"tuner": "grid"}, r"tuner must be one of"),
        ({"dropout": {"type": "float", "min": 0, "max": 0.5}}, {"max_trials": 0}, r"max_trials must be"),
        ({"dropout": {"type": "float", "min": 0, "max": 0.5}}, {"trials": 3}, r"unknown tuning config key"),
        ({"dropout": {"type": "float", "min": 0, "max": 0.5}}, {"directory": 5}, r"directory must be a path, got 5"),
        ({"learning_rate": {"type": "float", "min": 1e-4, "max": 1e-2, "sampling": "log", "step": 0.001}}, {},
         r"step is a factor and must be in \(1, max / min\]"),
        (
            {
                "gate": {"type": "choice", "values": ["static", "input_conditioned"]},
                "gate_hidden": {"type": "choice", "values": [8, 16], "when": {"gate": "input_conditioned"}},
                "dropout": {"type": "float", "min": 0, "max": 0.5, "when": {"gate_hidden": 8}},
            },
            {},
            r"'gate_hidden' is itself conditional",
        ),
        ({"dropout": {"type": "float", "min": 0, "max": 0.5}}, {"time_budget_minutes": float("nan")}, r"time_budget_minutes must be"),
        ({"dropout": {"type": "float", "min": 0, "max": 0.5}}, {"seed": -1}, r"seed must be an integer in 0..2\*\*32-1"),
        ({"dropout": {"type": "float", "min": 0, "max": 0.5}}, {"chief_wait_minutes": 0}, r"chief_wait_minutes must be"),
        # The trials' learning-rate schedule spans their 1 epoch, not train.epochs.
        (
            {"warmup_epochs": {"type": "float", "min": 0.0, "max": 3.0}},
            {"experiment": dict(tiny_experiment(), train={"epochs": 6, "output_dir": "unused"})},
            r"warmup_epochs reaches 3 .*longer than the 1 epoch\(s\) a trial trains",
        ),
    ],
)
def test_bad_config_is_refused_before_any_trial(tmp_path, monkeypatch, space, overrides, message):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    config = write_tuning(tmp_path, search_space="space.yaml", **overrides)

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(search_module, "load_search_data", no_data)
    with pytest.raises(ConfigError, match=message):
        run_search(config, verbose=0)
    assert not (tmp_path / "search").exists()


def test_a_search_takes_a_tuning_config_object_or_mapping(tmp_path, monkeypatch):
    path = write_tuning(tmp_path)
    from_file = search_module.prepare(path)
    monkeypatch.chdir(tmp_path)  # a mapping's relative paths are read from here
    for given in (TuningConfig.load(path), yaml.safe_load(path.read_text())):
        tuning, base, space = search_module.prepare(given)
        assert tuning.project == "search" and space.names == from_file[2].names
        assert base.to_dict() == from_file[1].to_dict()
    with pytest.raises(TypeError, match="a tuning config file, a TuningConfig or a mapping.*got int"):
        run_search(3, verbose=0)


def test_an_int_with_log_sampling_and_no_step_registers():
    space = SearchSpace.from_dict({"embedding_dim": {"type": "int", "min": 8, "max": 64, "sampling": "log"}})
    hp = kt.HyperParameters()
    space.declare(hp)
    assert 8 <= hp.get("embedding_dim") <= 64


def test_every_value_of_a_stepped_float_range_is_sampled_the_top_included():
    """KerasTuner counts (max - min) // step + 1 values, and 0.5 // 0.05 is 9 in
    floating point: the shipped dropout range never tried 0.5."""
    space = SearchSpace.from_dict({"dropout": {"type": "float", "min": 0.0, "max": 0.5, "step": 0.05}})
    hp = kt.HyperParameters()
    space.declare(hp)
    [declared] = hp.space
    values = sorted(round(v, 9) for v in declared.values)
    assert values == [round(0.05 * k, 9) for k in range(11)]
    assert max(declared.random_sample(seed=seed) for seed in range(400)) == pytest.approx(0.5)
    off_grid = SearchSpace.from_dict({"dropout": {"type": "float", "min": 0.0, "max": 0.5, "step": 0.2}})
    hp = kt.HyperParameters()
    off_grid.declare(hp)
    assert sorted(round(v, 9) for v in hp.space[0].values) == [0.0, 0.2, 0.4]


def test_resuming_over_another_space_or_experiment_is_refused(resumed_search, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(resumed_search["folder"], folder)
    (folder / "narrow.yaml").write_text(yaml.safe_dump({"dropout": {"type": "float", "min": 0.4, "max": 0.5}}))
    with pytest.raises(ConfigError, match="another search space"):
        run_search(write_tuning(folder, max_trials=3, search_space="narrow.yaml"), verbose=0)
    other = tiny_experiment()
    other["data"]["batch_size"] = 16
    with pytest.raises(ConfigError, match="another base experiment"):
        run_search(write_tuning(folder, max_trials=3, experiment=other), verbose=0)
    # The base experiment's name and output folder are no part of a trial.
    renamed = tiny_experiment()
    renamed["name"], renamed["train"]["output_dir"] = "renamed", "elsewhere"
    tuning, base, space = search_module.prepare(write_tuning(folder, max_trials=2, experiment=renamed))
    record_module.check_same_search(tuning.project_dir, tuning, base, space)
    # A search of a tfface that split the data otherwise (or before 0.2.0,
    # which recorded no split method) ranks trials on other validation images.
    meta = tuning.project_dir / "search.json"
    recorded = json.loads(meta.read_text())
    assert recorded["split"]["split_method"] == split_record(0.2, 0)["split_method"]
    for split, message in ((None, "records no split method"), (dict(recorded["split"], split_method=2), "split by method 2")):
        meta.write_text(json.dumps({k: v for k, v in dict(recorded, split=split).items() if v is not None}))
        with pytest.raises(ConfigError, match=f"{message}.*would rank trials validated on different images"):
            record_module.check_same_search(tuning.project_dir, tuning, base, space)


def write_utkface_folder(root: Path, first: int, count: int) -> list:
    """`count` tiny UTKFace-named images (age_gender_race_date.jpg) in root/images."""
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first, first + count):
        path = root / "images" / f"{20 + i}_{i % 2}_{i % 5}_2017011617{i:05d}.jpg.chip.jpg"
        Image.fromarray(np.full((8, 8, 3), 40 + 5 * i, np.uint8)).save(path, "JPEG")
        paths.append(path)
    return paths


def utkface_search(folder: Path, **overrides) -> Path:
    """A one-trial search of the UTKFace folder `utk_data`, named relative
    to the working directory (so a copy of `folder` searches its own copy)."""
    experiment = tiny_experiment(schema="utkface")
    experiment["data"].update(sources=["utk_data"], batch_size=8)
    (folder / "space.yaml").write_text(yaml.safe_dump({"dropout": {"type": "choice", "values": [0.1]}}))
    settings = dict(project="utk", max_trials=1, search_space="space.yaml", experiment=experiment)
    return write_tuning(folder, **dict(settings, **overrides))


@pytest.fixture(scope="module")
def utk_search(tmp_path_factory):
    """A one-trial search of 20 UTKFace images; copy its folder to resume it."""
    folder = tmp_path_factory.mktemp("utk_search")
    write_utkface_folder(folder / "utk_data", 0, 20)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        first = run_search(utkface_search(folder), verbose=0)
    assert first["trials_run"] == ["0"]
    return folder


def _copy_of(folder: Path, tmp_path: Path, monkeypatch) -> Path:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    monkeypatch.chdir(copy)
    return copy


def test_resuming_after_the_data_folder_changed_is_refused(utk_search, tmp_path, monkeypatch):
    folder = _copy_of(utk_search, tmp_path, monkeypatch)
    project, data = folder / "utk", folder / "utk_data"
    meta = project / "search.json"
    [recorded] = json.loads(meta.read_text())["data"]["sources"]
    assert recorded["source"] == "utk_data"  # as the config names it
    assert (recorded["train_images"], recorded["val_images"]) == (16, 4)
    assert re.fullmatch(r"[0-9a-f]{32}", recorded["val_ids"]) and recorded["val_ids"] != recorded["train_ids"]
    state = {path: path.read_bytes() for path in [meta, project / "oracle.json", project / "trial_0" / "trial.json"]}

    # Three more images: 5 validation images where the trials so far had 4.
    added = write_utkface_folder(data, 20, 3)
    with pytest.raises(ConfigError) as refused:
        run_search(utkface_search(folder, max_trials=2), verbose=0)
    message = str(refused.value)
    assert "validation images of source utk_data: 4 before, 5 now" in message
    assert "training images of source utk_data: 16 before, 18 now" in message
    assert "would rank trials validated on different images" in message and f"remove {project}" in message
    assert {path: path.read_bytes() for path in state} == state  # nothing was rewritten
    assert not (project / "trial_1").exists()  # no trial ran

    # A distributed chief refuses as well (it reads no dataset, only the
    # split); a worker never writes search.json.
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(_free_port()))
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    with pytest.raises(ConfigError, match="validation images of source utk_data: 4 before, 5 now"):
        run_search(utkface_search(folder, max_trials=2), verbose=0)
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    with pytest.raises(TuningError, match="no chief answered"):
        run_search(utkface_search(folder, max_trials=2, chief_wait_minutes=0.01), verbose=0)
    assert {path: path.read_bytes() for path in state} == state
    for name in ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        monkeypatch.delenv(name)

    # As many images as before, but one of them another.
    for path in added:
        path.unlink()
    min(data.glob("images/*.jpg")).unlink()
    write_utkface_folder(data, 30, 1)
    with pytest.raises(ConfigError, match=r"images of source utk_data: \d+ before and now, but not the same images"):
        run_search(utkface_search(folder), verbose=0)
    assert meta.read_bytes() == state[meta]


def test_resuming_with_the_same_data_or_an_older_record_works(utk_search, tmp_path, monkeypatch):
    folder = _copy_of(utk_search, tmp_path, monkeypatch)
    meta = folder / "utk" / "search.json"
    recorded = json.loads(meta.read_text())
    assert recorded["data"]["sources"][0]["val_images"] == 4
    # The same data: resumed (nothing left to run at max_trials 1).
    again = run_search(utkface_search(folder), verbose=0)
    assert again["trials_run"] == [] and [r["status"] for r in again["trials"]] == ["COMPLETED"]
    assert json.loads(meta.read_text())["data"] == recorded["data"]
    # A search.json of a tfface that recorded no data is accepted, and the
    # record is added when it is rewritten.
    meta.write_text(json.dumps({k: v for k, v in recorded.items() if k != "data"}, indent=2))
    again = run_search(utkface_search(folder), verbose=0)
    assert again["trials_run"] == [] and again["trials"][0]["status"] == "COMPLETED"
    assert json.loads(meta.read_text())["data"] == recorded["data"]


def test_other_label_values_for_the_same_images_refuse_a_resume(tmp_path):
    from tfface.data.source import FaceSource

    def source(ages, identities=(1, 2, 3)):
        return FaceSource(
            name="s", format="utkface", columns={"age": np.array(ages), "male": np.array([1, 0, -1])},
            image_paths=np.array(["c.jpg", "a.jpg", "b.jpg"]), identities=np.array(identities),
        )

    config = ExperimentConfig.from_dict({"data": {"sources": ["s"]}})
    recorded = data_module.data_record(config, [source([30, 40, 50])], [source([1, 2, 3])])
    project = tmp_path / "p"
    project.mkdir()
    (project / "search.json").write_text(json.dumps({"data": recorded}))
    # The same rows in another order: the same data.
    reordered = source([30, 40, 50]).subset([2, 0, 1])
    record_module.check_same_data(project, data_module.data_record(config, [reordered], [source([1, 2, 3])]))
    # One age changed, then one identity: refused, naming the side.
    for train, val, side in ((source([30, 41, 50]), source([1, 2, 3]), "training"),
                             (source([30, 40, 50]), source([1, 2, 3], identities=(1, 2, 4)), "validation")):
        with pytest.raises(ConfigError, match=rf"{side} labels of source s: the same 3 images, but other label values"):
            record_module.check_same_data(project, data_module.data_record(config, [train], [val]))
    # A record without label digests (tfface 0.2.1) compares the images only.
    for entry in recorded["sources"]:
        del entry["train_labels"], entry["val_labels"]
    (project / "search.json").write_text(json.dumps({"data": recorded}))
    record_module.check_same_data(project, data_module.data_record(config, [source([30, 41, 50])], [source([1, 2, 3])]))


def test_the_data_record_names_each_changed_side(tmp_path):
    before = {"image_ids": data_module.IMAGE_IDS, "sources": [
        {"source": "a", "train_images": 10, "val_images": 2, "train_ids": "t", "val_ids": "v"},
        {"source": "b", "train_images": 5, "val_images": 1, "train_ids": "t", "val_ids": "v"},
    ]}
    project = tmp_path / "p"
    project.mkdir()
    (project / "search.json").write_text(json.dumps({"data": before}))
    record_module.check_same_data(project, before)  # unchanged
    now = json.loads(json.dumps(before))
    now["sources"][1]["train_ids"] = "other"
    with pytest.raises(ConfigError, match=r"training images of source b: 5 before and now, but not the same images"):
        record_module.check_same_data(project, now)
    now = json.loads(json.dumps(before))
    now["sources"][0]["val_images"] = 3
    with pytest.raises(ConfigError, match=r"validation images of source a: 2 before, 3 now;"):
        record_module.check_same_data(project, now)
    now["sources"] = now["sources"][:1]
    with pytest.raises(ConfigError, match=r"sources \['a', 'b'\] before, \['a'\] now"):
        record_module.check_same_data(project, now)


def test_search_json_records_the_images_the_search_read(resumed_search):
    [recorded] = json.loads((resumed_search["folder"] / "search" / "search.json").read_text())["data"]["sources"]
    assert recorded["source"] == "synthetic:200"
    assert recorded["train_images"] + recorded["val_images"] == 200 and recorded["val_images"] > 0
    # The record comes from the data the search read, not from a second read.
    assert resumed_search["loads"] == (1, 1)
    # Images held in memory are told apart by their pixels, files by their path.
    source = open_source("synthetic:4", image_size=32)
    ids = data_module.image_ids(source)
    assert len(set(ids)) == 4 and ids == data_module.image_ids(source.subset([0, 1, 2, 3]))
    utk = resumed_search["folder"] / "ids_utk"
    write_utkface_folder(utk, 0, 3)
    assert sorted(data_module.image_ids(open_source(str(utk)))) == sorted(os.listdir(utk / "images"))


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML reads 1e-4 as a string; the space accepts it as a number.
    space = SearchSpace.from_dict(yaml.safe_load("learning_rate: {type: float, min: 1e-4, max: 1e-2, sampling: log}"))
    assert space.specs[0].min == pytest.approx(1e-4) and space.specs[0].max == pytest.approx(1e-2)
    # A choice's default too.
    space = SearchSpace.from_dict(yaml.safe_load("learning_rate: {type: choice, values: [1.0e-3, 1.0e-2], default: 1e-3}"))
    assert space.specs[0].default == pytest.approx(1e-3)


def test_a_notebook_hypermodel_refuses_what_would_fail_its_trials():
    # Each would fail trials mid-search (three in a row stop it), or never
    # reach the learning rate being tuned.
    base = ExperimentConfig.from_dict(tiny_experiment())
    base.train.epochs = 6
    space = SearchSpace.from_dict(
        {"correlation_init": {"type": "choice", "values": ["identity", "label_correlation"]}}
    ).check(base)
    with pytest.raises(ConfigError, match=r"trials may start the correlation layer from the training labels.*pass train_labels="):
        hypermodel_for(base, space, schedule_epochs=2)
    hypermodel_for(base, space, schedule_epochs=2, train_labels={}, builds_models=True)
    hypermodel_for(base, space, schedule_epochs=2, builds_models=False)  # a search's chief
    warm = SearchSpace.from_dict({"warmup_epochs": {"type": "float", "min": 0.0, "max": 5.0}}).check(base)
    with pytest.raises(ConfigError, match=r"warmup_epochs reaches 5 .*longer than the 2 epoch\(s\) a trial trains"):
        hypermodel_for(base, warm, schedule_epochs=2)
    hypermodel_for(base, warm, schedule_epochs=5)


def test_a_second_search_into_a_running_project_is_refused(tmp_path, monkeypatch):
    from tfface.atomic_files import FolderBusyError
    from tfface.atomic_files import folder_lock

    config = write_tuning(tmp_path)

    def no_data(*args, **kwargs):
        raise AssertionError("data was read by the second search")

    monkeypatch.setattr(search_module, "load_search_data", no_data)
    project = tmp_path / "search"
    project.mkdir()
    (project / "oracle.json").write_text("{}")
    with folder_lock(project):  # what the running `tfface tune` holds
        with pytest.raises(FolderBusyError, match=r"search is being searched by another process"):
            run_search(config, verbose=0)
    assert [p.name for p in project.iterdir()] == ["oracle.json"]


def test_each_tuner_type_is_made_with_its_oracle(tmp_path):
    base = ExperimentConfig.from_dict(tiny_experiment())
    space = SearchSpace.load(SPACES["gated"]).check(base)
    hypermodel = hypermodel_for(base, space, builds_models=False)  # builds nothing here
    expected = {
        "random": "RandomSearchOracle",
        "hyperband": "HyperbandOracle",
        "bayesian": "BayesianOptimizationOracle",
    }
    for name, oracle in expected.items():
        tuning = TuningConfig.from_dict(
            {"project": name, "experiment": {}, "search_space": "x", "tuner": name, "max_epochs": 3,
             "directory": str(tmp_path)}
        )
        tuner = make_tuner(tuning, hypermodel)
        assert type(tuner.oracle).__name__ == oracle
        assert tuner.oracle.objective.name == "val_mean_balanced_accuracy"
        assert tuner.oracle.objective.direction == "max"
        assert set(space.names) <= {p.name for p in tuner.oracle.get_space().space}
        assert Path(tuner.project_dir) == tmp_path / name


# --- a search, resumed --------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_search(tmp_path_factory):
    """A one-trial search, then the same project rerun with max_trials 2."""
    folder = tmp_path_factory.mktemp("tuning")
    from tfface.training import trainer

    calls = []
    real_load_sources = trainer.load_sources

    def counting_load_sources(data_config):
        calls.append(1)
        return real_load_sources(data_config)

    gradients_before = set(tuners_module._gradient_registry())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "load_sources", counting_load_sources)
        first = run_search(write_tuning(folder, max_trials=1), verbose=0)
        trial_0 = (folder / "search" / "trial_0" / "trial.json").read_bytes()
        loads_first = len(calls)
        second = run_search(write_tuning(folder, max_trials=2), verbose=0)
    leftover = {n for n in set(tuners_module._gradient_registry()) - gradients_before if n.startswith("CustomGradient")}
    return {"folder": folder, "first": first, "second": second, "trial_0": trial_0,
            "loads": (loads_first, len(calls) - loads_first), "leftover_gradients": leftover}


def test_resumed_search_keeps_completed_trials(resumed_search):
    first, second = resumed_search["first"], resumed_search["second"]
    assert first["trials_run"] == ["0"]
    assert second["trials_run"] == ["1"]  # trial 0 did not run again
    assert [r["trial_id"] for r in second["trials"]] == ["0", "1"]
    assert all(r["status"] == "COMPLETED" for r in second["trials"])
    assert second["trials"][0]["score"] == first["trials"][0]["score"]
    assert second["trials"][0]["values"] == first["trials"][0]["values"]
    assert (resumed_search["folder"] / "search" / "trial_0" / "trial.json").read_bytes() == resumed_search["trial_0"]
    # The data is read once per search, not once per trial.
    assert resumed_search["loads"] == (1, 1)


def test_trials_leave_no_traced_graph_behind(resumed_search):
    # TensorFlow registers a custom gradient per traced train step and never
    # drops it (its closure holds the whole graph): each trial drops its own.
    assert resumed_search["second"]["trials_run"]  # a trial did run
    assert resumed_search["leftover_gradients"] == set()


def test_search_writes_summary_plot_and_best_config_that_trains(resumed_search, tmp_path):
    from tfface.training.trainer import train

    result = resumed_search["second"]
    project = resumed_search["folder"] / "search"
    summary = (project / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if re.match(r"\| [01] \| completed \| 0\.\d+", line)]
    assert len(rows) == 2, summary
    assert "gate" in summary.splitlines()[summary.splitlines().index("## Trials") + 2]
    assert (project / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((project / "results.json").read_text())
    assert results["best"]["trial_id"] == result["best"]["trial_id"]
    best = result["best"]
    assert best["score"] == max(r["score"] for r in result["trials"])

    config = ExperimentConfig.load(project / "best_config.yaml")
    values = best["values"]
    assert config.model.gate == values["gate"]
    assert config.model.dropout == pytest.approx(values["dropout"])
    assert config.train.learning_rate == pytest.approx(values["learning_rate"])
    assert config.model.loss_weights["age_group"] == pytest.approx(values["loss_weights.age_group"])
    assert config.data.sources[0].path == "synthetic:200"

    config.train.output_dir = str(tmp_path / "run")
    trained = train(config, verbose=0)
    assert trained["epochs_run"] == 1
    assert (tmp_path / "run" / "model.keras").is_file()


@pytest.mark.slow
def test_search_killed_mid_trial_resumes_with_the_same_command(tmp_path):
    config = write_tuning(tmp_path, project="killed")
    trial_1 = tmp_path / "killed" / "trial_1" / "trial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfface.cli", "tune", "--config", str(config)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not trial_1.exists():  # trial 0 is done, trial 1 has started
            assert proc.poll() is None, "the search ended before it could be killed"
            assert time.monotonic() < deadline, "trial 1 never started"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    trial_0 = (tmp_path / "killed" / "trial_0" / "trial.json").read_bytes()
    assert json.loads(trial_0)["status"] == "COMPLETED"
    assert json.loads(trial_1.read_text())["status"] == "RUNNING"

    result = run_search(config, verbose=0)  # the same command again
    assert result["trials_run"] == ["1"]  # only the trial that was cut off
    assert [r["status"] for r in result["trials"]] == ["COMPLETED", "COMPLETED"]
    assert (tmp_path / "killed" / "trial_0" / "trial.json").read_bytes() == trial_0


def test_keras_tuner_state_files_are_replaced_whole(tmp_path, monkeypatch):
    from keras_tuner.src import utils as kt_utils

    tuners_module._make_keras_tuner_state_writes_atomic()
    state = tmp_path / "oracle.json"
    kt_utils.save_json(str(state), {"ongoing_trials": {}})
    assert json.loads(state.read_text()) == {"ongoing_trials": {}}

    def killed(*args):
        raise KeyboardInterrupt("killed between the write and the rename")

    monkeypatch.setattr(os, "replace", killed)  # what write_atomic renames with
    with pytest.raises(KeyboardInterrupt):
        kt_utils.save_json(str(state), {"ongoing_trials": {"1": "x"}})
    assert json.loads(state.read_text()) == {"ongoing_trials": {}}  # the old state, whole


def test_a_search_with_a_cut_short_state_file_names_it(tmp_path):
    config = write_tuning(tmp_path, project="torn")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "oracle.json").write_text("")
    with pytest.raises(TuningError, match=r"oracle.json is empty or cut short.*remove .*torn"):
        run_search(config, verbose=0)


# --- failures and budget --------------------------------------------------------------------


def test_search_where_every_trial_fails_raises_the_first_error(tmp_path, monkeypatch):
    def broken_fit(self, hp, model, *args, **kwargs):
        raise RuntimeError("fit exploded on purpose")

    monkeypatch.setattr(FaceHyperModel, "fit", broken_fit)
    with pytest.raises(TuningError, match=r"all 2 trials failed") as error:
        run_search(write_tuning(tmp_path), verbose=0)
    assert "fit exploded on purpose" in str(error.value)
    summary = (tmp_path / "search" / "summary.md").read_text()
    assert summary.count("| failed |") == 2
    assert not (tmp_path / "search" / "best_config.yaml").exists()


def test_a_search_keras_tuner_gives_up_on_is_reported_with_its_results(tmp_path, monkeypatch):
    def broken_fit(self, hp, model, *args, **kwargs):
        raise RuntimeError("fit exploded on purpose")

    monkeypatch.setattr(FaceHyperModel, "fit", broken_fit)
    # KerasTuner stops after 3 failed trials in a row, before max_trials:
    # reported like any failed search, with the results written.
    with pytest.raises(TuningError, match=r"all 3 trials failed") as error:
        run_search(write_tuning(tmp_path, max_trials=5), verbose=0)
    assert "fit exploded on purpose" in str(error.value) and "consecutive failures" in str(error.value)
    assert (tmp_path / "search" / "summary.md").read_text().count("| failed |") == 3
    assert (tmp_path / "search" / "results.json").is_file()


@pytest.mark.slow
def test_time_budget_stops_the_search_and_a_cut_trial_is_never_the_best(tmp_path):
    # The budget runs out during the first trial: it ends early and no
    # second trial starts, although max_trials is 3.
    project = tmp_path / "search"
    with pytest.raises(TuningError, match=r"the time budget ended all 1 completed trial\(s\) before their last epoch"):
        run_search(write_tuning(tmp_path, max_trials=3, time_budget_minutes=0.001), verbose=0)
    results = json.loads((project / "results.json").read_text())
    assert results["stopped_by_budget"] and results["best"] is None
    [cut] = results["trials"]
    assert cut["status"] == "COMPLETED" and cut["cut_by_budget_after_epochs"] == 1
    summary = (project / "summary.md").read_text()
    assert "the time budget (0.001 min) stopped this run" in summary and "| 0 | completed, cut after 1 epoch(s) |" in summary
    assert not (project / "best_config.yaml").exists()

    # Resumed with time to spare: the cut trial stays cut, a full one is the best.
    result = run_search(write_tuning(tmp_path, max_trials=2), verbose=0)
    assert result["trials_run"] == ["1"] and result["best"]["trial_id"] == "1"
    assert result["trials"][0]["cut_by_budget_after_epochs"] == 1 and not result["stopped_by_budget"]

    # A best_config.yaml the user edited is kept; the search writes beside it.
    best = project / "best_config.yaml"
    best.write_text(best.read_text() + "# my note\n")
    again = run_search(write_tuning(tmp_path, max_trials=2), verbose=0)
    assert best.read_text().endswith("# my note\n")
    assert again["best_config"] == str(project / "best_config.new.yaml")
    assert ExperimentConfig.load(project / "best_config.new.yaml").model.gate == result["best"]["values"]["gate"]

    # Trials of another length are not ranked with these.
    with pytest.raises(ConfigError, match=r"another trial budget \(epochs per trial, Hyperband settings, seed\)"):
        run_search(write_tuning(tmp_path, max_trials=3, epochs=2), verbose=0)


# --- distributed: KerasTuner chief + two workers -------------------------------------------


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_search_with_chief_and_two_workers(tmp_path):
    config = write_tuning(tmp_path, project="distributed", max_trials=2)
    env = subprocess_env(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(_free_port()))
    procs, logs = {}, {}
    try:
        for tuner_id in ("chief", "tuner0", "tuner1"):
            logs[tuner_id] = tmp_path / f"{tuner_id}.log"
            with open(logs[tuner_id], "w") as out:
                procs[tuner_id] = subprocess.Popen(
                    [sys.executable, "-m", "tfface.cli", "tune", "--config", str(config)],
                    env=dict(env, KERASTUNER_TUNER_ID=tuner_id),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=tmp_path,
                    start_new_session=True,
                )
        deadline = time.monotonic() + 110  # ~30 s on an idle 2-core machine
        for tuner_id, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{tuner_id} still running after the time bound:\n{logs[tuner_id].read_text()[-3000:]}")
        for tuner_id, proc in procs.items():
            assert proc.returncode == 0, f"{tuner_id} failed:\n{logs[tuner_id].read_text()[-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    ran = []
    for tuner_id in ("tuner0", "tuner1"):
        match = re.search(rf"worker {tuner_id} ran trials (\[.*\]); its data compared with the chief's", logs[tuner_id].read_text())
        assert match, logs[tuner_id].read_text()[-3000:]
        ran += ast.literal_eval(match.group(1))
    assert sorted(ran) == ["0", "1"]  # every trial ran once, on a worker
    results = json.loads((tmp_path / "distributed" / "results.json").read_text())
    assert [r["status"] for r in results["trials"]] == ["COMPLETED", "COMPLETED"]
    assert (tmp_path / "distributed" / "best_config.yaml").is_file()
    assert "best trial" in logs["chief"].read_text()


def test_a_worker_without_a_chief_stops_with_the_address_it_tried(tmp_path, monkeypatch):
    config = write_tuning(tmp_path, project="lonely", chief_wait_minutes=0.02)
    port = _free_port()  # nothing listens there
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(port))
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    fake_data = types.SimpleNamespace(steps_per_epoch=1, train_labels={}, train=None, val=None)
    monkeypatch.setattr(search_module, "load_search_data", lambda base: fake_data)
    started = time.monotonic()
    with pytest.raises(TuningError, match=rf"worker tuner0: no chief answered at 127.0.0.1:{port} within 0.02 min"):
        run_search(config, verbose=0)
    assert time.monotonic() - started < 30


def test_a_worker_on_other_data_than_the_chief_recorded_is_refused(tmp_path, monkeypatch):
    config = write_tuning(tmp_path, project="shared")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(_free_port()))
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner0")
    monkeypatch.setattr(search_module, "wait_for_chief", lambda minutes: None)  # the chief answered

    class ReachedTheTuner(Exception):
        pass

    def make_tuner(*args, **kwargs):
        raise ReachedTheTuner

    monkeypatch.setattr(search_module, "make_tuner", make_tuner)

    def record(val_images):
        return {"image_ids": data_module.IMAGE_IDS, "sources": [
            {"source": "d", "train_images": 10, "val_images": val_images, "train_ids": "t", "val_ids": "v",
             "train_labels": "tl", "val_labels": "vl"}]}

    fake_data = types.SimpleNamespace(steps_per_epoch=1, train_labels={}, train=None, val=None, data_record=record(2))
    monkeypatch.setattr(search_module, "load_search_data", lambda base: fake_data)
    # No search.json of the chief (a folder of the worker's own): nothing to compare, the worker goes on.
    with pytest.raises(ReachedTheTuner):
        run_search(config, verbose=0)
    # The chief's search.json in the shared folder records other validation images.
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "search.json").write_text(json.dumps({"data": record(3)}))
    with pytest.raises(ConfigError, match=r"worker tuner0: its data is not the data the chief recorded in .*"
                                          r"validation images of source d: 3 the chief's, 2 this worker's"):
        run_search(config, verbose=0)
    # The same data as the chief's: on to the trials.
    fake_data.data_record = record(3)
    with pytest.raises(ReachedTheTuner):
        run_search(config, verbose=0)


@pytest.mark.slow
def test_a_frozen_mask_predictor_is_searched_only_with_pretraining(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"mask_trainable": {"type": "choice", "values": [True, False]}}))
    experiment = tiny_experiment("mask_guided", schema="synthetic")
    base = ExperimentConfig.from_dict(experiment)
    with pytest.raises(ConfigError, match=r"'mask_trainable': value False is refused: .*mask_pretrain_epochs > 0"):
        SearchSpace.load(space_file).check(base)

    experiment["train"]["mask_pretrain_epochs"] = 1
    base = ExperimentConfig.from_dict(experiment)
    space = SearchSpace.load(space_file).check(base)
    data = open_source("synthetic:64", image_size=32)
    from tfface.data.pipeline import make_dataset
    from tfface.schema import get_schema

    train = make_dataset([data], get_schema("synthetic"), 32, batch_size=32, training=True, with_masks=True)
    hypermodel = hypermodel_for(base, space, steps_per_epoch=2, schedule_epochs=1)
    hp = _sample(space, {"mask_trainable": False}, 0)
    model = hypermodel.build(hp)
    predictor = model.get_layer("mask_predictor")
    untrained = [w.copy() for w in predictor.get_weights()]
    hypermodel.fit(hp, model, train, epochs=1, verbose=0, shuffle=False)
    assert predictor.trainable_weights == []
    assert any(np.abs(a - b).max() > 0 for a, b in zip(predictor.get_weights(), untrained))  # it was pretrained


@pytest.mark.slow
def test_the_search_deadline_stops_a_trials_mask_pretraining(tmp_path, monkeypatch):
    experiment = tiny_experiment("mask_guided", schema="synthetic")
    experiment["train"]["mask_pretrain_epochs"] = 20
    base = ExperimentConfig.from_dict(experiment)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"dropout": {"type": "choice", "values": [0.1]}}))
    space = SearchSpace.load(space_file).check(base)
    from tfface.data.pipeline import make_dataset
    from tfface.schema import get_schema
    from tfface.training import trainer

    train = make_dataset(
        [open_source("synthetic:64", image_size=32)], get_schema("synthetic"), 32, batch_size=32, training=True,
        with_masks=True,
    )
    records = []
    pretrain = trainer.pretrain_masks
    monkeypatch.setattr(trainer, "pretrain_masks", lambda *a, **k: records.append(pretrain(*a, **k)))
    hypermodel = hypermodel_for(base, space, steps_per_epoch=2, schedule_epochs=1)
    hp = _sample(space, {}, 0)
    spent = tuners_module._stop_at_deadline_callback(time.time() - 1.0)
    history = hypermodel.fit(hp, hypermodel.build(hp), train, epochs=1, verbose=0, callbacks=[spent])
    assert len(records[0]["history"]["loss"]) == 1  # of 20 pretraining epochs
    assert len(history.history["loss"]) == 1


@pytest.mark.slow
def test_a_trial_killed_before_the_oracle_recorded_it_is_drawn_again(tmp_path):
    # KerasTuner writes a new trial's trial.json, then oracle.json: a kill in
    # between left trial 1 RUNNING but unknown to the oracle, never rerun and
    # yet counted toward max_trials.
    config = write_tuning(tmp_path, project="unrecorded", max_trials=1)
    run_search(config, verbose=0)
    project = tmp_path / "unrecorded"
    state = json.loads((project / "trial_0" / "trial.json").read_text())
    state.update(trial_id="1", status="RUNNING", score=None, best_step=0, message=None)
    state["metrics"] = {"metrics": {}}
    (project / "trial_1").mkdir()
    (project / "trial_1" / "trial.json").write_text(json.dumps(state))

    result = run_search(write_tuning(tmp_path, project="unrecorded", max_trials=2), verbose=0)
    assert result["trials_run"] == ["1"]
    assert [r["status"] for r in result["trials"]] == ["COMPLETED", "COMPLETED"]


@pytest.mark.slow
def test_a_disk_too_full_for_a_trials_checkpoint_is_one_error_line_and_the_rerun_resumes(tmp_path):
    # KerasTuner writes each trial's checkpoint in place with HDF5: a disk
    # that filled in the middle of it crashed the search (segfault) after 23
    # tracebacks. The room is checked before the write.
    with small_disk(tmp_path / "disk", "1500k") as disk:
        config = write_tuning(tmp_path, directory=str(disk), experiment={**tiny_experiment(), "data": {
            **tiny_experiment()["data"], "sources": ["synthetic:64"]}})
        command = [sys.executable, "-m", "tfface.cli", "tune", "--config", str(config)]
        full = subprocess.run(command, capture_output=True, text=True, timeout=400, env=subprocess_env())
        assert full.returncode == 2, full.stderr[-3000:]
        assert (
            f"tfface tune: error: search search stopped: [Errno 28] not enough free space for trial 0's checkpoint in "
            f"{disk / 'search' / 'trial_0'}"
        ) in full.stderr
        assert "Traceback" not in full.stderr
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        again = subprocess.run(command, capture_output=True, text=True, timeout=400, env=subprocess_env())
        assert again.returncode == 0, again.stderr[-3000:]
        assert (disk / "search" / "best_config.yaml").is_file()
        assert sorted(json.loads((disk / "search" / "results.json").read_text())["trials"][i]["status"]
                      for i in range(2)) == ["COMPLETED", "COMPLETED"]
