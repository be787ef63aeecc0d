"""Training runs: outputs, resume after a kill, multi-worker, CLI errors."""

import csv
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from harness import small_disk

import tfface
from tfface.cli import main as cli_main
from tfface.config import ConfigError
from tfface.config import ExperimentConfig
from tfface.config import SourceConfig
from tfface.data.splits import split_record

TINY = {
    "name": "tiny",
    "data": {
        "sources": [{"path": "synthetic:160"}],
        "schema": "synthetic",
        "image_size": 32,
        "batch_size": 16,
        "val_fraction": 0.2,
    },
    "model": {
        "image_size": 32,
        "backbone_widths": [8, 16, 32, 64],
        "embedding_dim": 16,
    },
    "train": {"epochs": 2, "learning_rate": 0.003},
}


def _write_config(tmp_path, **train_overrides):
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(train_overrides)
    raw["train"].setdefault("output_dir", str(tmp_path / "run"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _env():
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _epochs_logged(run_dir):
    with open(run_dir / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def _kill_after_backup_of(epoch_to_kill, monkeypatch):
    """Makes the next run 'killed' (KeyboardInterrupt) right after the backup
    of epoch `epoch_to_kill` (0-based) is written."""
    back_up = keras.callbacks.BackupAndRestore.on_epoch_end

    def killed(self, epoch, logs=None):
        back_up(self, epoch, logs)
        if epoch == epoch_to_kill:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", killed)


@pytest.mark.slow
def test_train_writes_model_logs_and_summary(tmp_path):
    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path))
    summary = train(config, verbose=0)
    run = Path(summary["output_dir"])
    assert summary["epochs_run"] == 2
    assert (run / "model.keras").is_file()
    assert (run / "last.keras").is_file()
    assert _epochs_logged(run) == [0, 1]
    assert any((run / "logs").rglob("events.out.tfevents.*"))
    assert "val_mean_balanced_accuracy" in summary["history"]
    assert [(s["path"], s["format"]) for s in summary["sources"]] == [("synthetic:160", "synthetic")]
    assert summary["sources"][0]["train_examples"] == summary["train_examples"]
    # The saved config trains the same run again unchanged.
    assert ExperimentConfig.load(run / "config.yaml").to_dict() == config.to_dict()
    # The backup used for resuming is removed after a finished run.
    assert not (run / "backup").exists() or not any((run / "backup").iterdir())
    # Another config into the same folder is refused before anything is
    # written, as is a source that does not open, and the finished run is
    # not trained over.
    saved = (run / "config.yaml").read_text()
    model_bytes = (run / "model.keras").read_bytes()
    with pytest.raises(ConfigError, match="holds a finished run"):
        train(config, verbose=0)
    assert (run / "model.keras").read_bytes() == model_bytes
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, gate="none"))
    with pytest.raises(ConfigError, match=r"different config \(differs in \['model.gate'\]\)"):
        train(other, verbose=0)
    missing = dataclasses.replace(config, data=dataclasses.replace(config.data, sources=[SourceConfig(str(tmp_path / "nope"))]))
    with pytest.raises(FileNotFoundError, match="nope"):
        train(missing, verbose=0)
    assert (run / "config.yaml").read_text() == saved


@pytest.mark.slow
def test_a_run_stopped_by_its_time_budget_continues_when_run_again(tmp_path):
    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path, epochs=3, time_budget_minutes=1e-6))
    first = train(config, verbose=0)
    run = Path(first["output_dir"])
    assert (first["epochs_run"], first["stopped_by"]) == (1, "time_budget")
    assert any((run / "backup").iterdir())  # kept, unlike after a finished run
    # The budget is one of the settings a resumed run may change.
    more_time = dataclasses.replace(config, train=dataclasses.replace(config.train, time_budget_minutes=None))
    second = train(more_time, verbose=0)
    assert (second["stopped_by"], second["epochs_run"]) == ("epochs", 3)
    assert len(second["history"]["loss"]) == 2  # this call's epochs
    assert _epochs_logged(run) == [0, 1, 2]
    with pytest.raises(ConfigError, match="holds a finished run"):
        train(more_time, verbose=0)
    # A budget spent in the last epoch stopped nothing: the run is finished.
    (tmp_path / "last").mkdir()
    last = ExperimentConfig.load(_write_config(tmp_path / "last", epochs=1, time_budget_minutes=1e-6))
    done = train(last, verbose=0)
    assert (done["stopped_by"], done["epochs_run"]) == ("epochs", 1)
    assert not (Path(done["output_dir"]) / "backup").exists() or not any((Path(done["output_dir"]) / "backup").iterdir())


def test_a_folder_with_outputs_but_no_run_config_is_not_trained_over(tmp_path):
    from tfface.training.resume import check_resumable

    config = ExperimentConfig.load(_write_config(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"someone else's model")
    with pytest.raises(ConfigError, match="no config.yaml"):
        check_resumable(run, config)
    assert (run / "model.keras").read_bytes() == b"someone else's model"
    # A kill during the first epoch leaves a history with no row: nothing
    # was trained, so a corrected config may start there.
    (run / "model.keras").unlink()
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, gate="none"))
    config.save(run / "config.yaml")
    (run / "history.csv").write_text("epoch,loss\n")
    check_resumable(run, other)
    (run / "history.csv").write_text("epoch,loss\n0,1.5\n")
    with pytest.raises(ConfigError, match="different config"):
        check_resumable(run, other)


@pytest.mark.slow
def test_killed_run_resumes_without_losing_finished_epochs(tmp_path):
    epochs = 10  # headroom so the kill lands mid-run even on a fast machine
    config = _write_config(tmp_path, epochs=epochs)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "tfface.cli", "train", "--config", str(config)]
    first = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (run / "history.csv").is_file() and len(_epochs_logged(run)) >= 2:
                break
            if first.poll() is not None:
                pytest.fail("training finished before it could be killed; make the run longer")
            time.sleep(0.2)
        else:
            pytest.fail("no epoch finished in time")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    done_before = _epochs_logged(run)
    assert 2 <= len(done_before) < epochs
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-2000:]
    # Every epoch was logged once, and the epochs finished before the kill
    # (all but at most the last logged, whose backup the kill may have cut)
    # were not trained again.
    assert _epochs_logged(run) == list(range(epochs))
    assert result.stdout.count("Epoch ") <= epochs - len(done_before) + 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(workers, index):
    """The environment of worker `index` of a TF_CONFIG cluster of `workers`
    (addresses; `_free_port()` ones on 127.0.0.1)."""
    env = _env()
    env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
    return env


def _local_workers(count):
    return [f"127.0.0.1:{_free_port()}" for _ in range(count)]


def _run_two_local_workers(argv_of, timeout):
    """Runs `argv_of(index)` as workers 0 and 1 of one TF_CONFIG cluster on
    127.0.0.1; returns their outputs once both exited 0."""
    workers = _local_workers(2)
    procs = []
    try:
        for index in range(2):
            procs.append(
                subprocess.Popen(
                    argv_of(index), env=_worker_env(workers, index), stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True,
                )
            )
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    return outputs


@pytest.mark.slow
def test_multi_worker_training_on_two_local_workers(tmp_path):
    # Early stopping on: its scores are shared from the chief before fit.
    # One output folder for both, as on a shared file system: the workers
    # wrote the same backup files and crashed about half the time.
    config = _write_config(tmp_path, epochs=1, strategy="multi_worker", early_stopping_patience=2)
    # 173 examples leave 33 validation images, in batches of 16: one worker gets no image of the
    # last batch, which failed in TensorFlow's CPU batch norm until padded.
    raw = yaml.safe_load(config.read_text())
    raw["data"]["sources"] = [{"path": "synthetic:173"}]
    config.write_text(yaml.safe_dump(raw))
    _run_two_local_workers(
        lambda index: [
            sys.executable, "-m", "tfface.cli", "train", "--config", str(config), "--output-dir", str(tmp_path / "run")
        ],
        timeout=400,
    )
    # Worker 0 is the chief: it alone writes the run's files; worker 1 keeps
    # its own config and resume state in a folder of its own.
    run = tmp_path / "run"
    assert (run / "model.keras").is_file() and _epochs_logged(run) == [0]
    assert json.loads((run / "train_summary.json").read_text())["val_examples"] == 33
    assert sorted(p.name for p in (run / "worker1").iterdir()) == ["config.yaml", "split.json"]
    assert not (run / "worker1" / "model.keras").exists()


def test_tf_config_is_read_only_by_multi_worker_runs_and_named_when_wrong(tmp_path, monkeypatch):
    from tfface.training.distribution import is_chief
    from tfface.training.distribution import read_tf_config
    from tfface.training.distribution import worker_folder

    worker1 = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(worker1))
    # A TF_CONFIG left in the environment made a default run a non-chief that saved nothing.
    assert is_chief("default") and is_chief("mirrored") and worker_folder(tmp_path, "default") == tmp_path
    assert not is_chief("multi_worker") and worker_folder(tmp_path, "multi_worker") == tmp_path / "worker1"
    for text, message in [
        ("", "needs the TF_CONFIG environment variable"),
        ("{bad json", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no "cluster"'),
        ('{"cluster": {"worker": ["a:1"]}}', 'TF_CONFIG has no "task"'),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}}',
         r"TF_CONFIG's task worker 5 is not in its cluster \(2 worker address\(es\)\)"),
    ]:
        monkeypatch.setenv("TF_CONFIG", text)
        with pytest.raises(ConfigError, match=message):
            read_tf_config()
        assert is_chief("default")


def test_a_multi_worker_run_says_which_workers_it_waits_for(caplog):
    # TensorFlow's own "waiting for tasks" lines are hidden by the CLI's log
    # level: a worker whose peer never started looked hung.
    from tfface.training.distribution import log_cluster_wait

    cluster = {"chief": ["h0:1"], "worker": ["h1:1", "h2:1"]}
    with caplog.at_level(logging.INFO, logger="tfface.training.distribution"):
        log_cluster_wait({"cluster": cluster, "task": {"type": "worker", "index": 0}}, 15.0)
    assert "worker 0 of 3 waiting for chief 0 (h0:1), worker 1 (h2:1) to start" in caplog.text
    assert "up to 15 min, train.cluster_wait_minutes; Ctrl+C or SIGKILL stops a worker while it waits" in caplog.text


LONE_WORKER = """
from tfface.training import distribution
distribution.make_strategy("multi_worker", 0.05)
print("strategy made")
"""


@pytest.mark.parametrize("index", [0, 1])
def test_a_worker_whose_peers_never_start_gives_up_after_cluster_wait_minutes(index):
    # TensorFlow waits for the others with no limit on worker 0 (the GIL
    # held, SIGTERM taken), so a wrong address or a forgotten worker hung.
    workers = _local_workers(2)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", LONE_WORKER], env=_worker_env(workers, index), capture_output=True, text=True,
        timeout=240,
    )
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr[-2000:]
    assert "strategy made" not in result.stdout
    other = workers[1 - index]
    assert (
        f"tfface: error: multi_worker: worker {index} waited 0.05 min (train.cluster_wait_minutes) for the other "
        f"workers of TF_CONFIG's cluster (worker {1 - index} ({other}))" in result.stderr
    )
    assert time.monotonic() - start < 120


WAITING_WORKER = """
import logging
logging.basicConfig(level=logging.INFO)
from tfface.training import distribution
distribution.make_strategy("multi_worker", 5)
print("strategy made")
"""


def test_ctrl_c_ends_a_worker_waiting_for_its_cluster():
    # TensorFlow's wait holds the GIL, so Python's Ctrl+C handler never ran:
    # a worker whose peers never started could only be ended by SIGKILL.
    process = subprocess.Popen(
        [sys.executable, "-c", WAITING_WORKER], env=_worker_env(_local_workers(2), 0), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        for line in process.stderr:
            if "waiting for worker 1" in line:
                break
        time.sleep(3)  # into TensorFlow's wait
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl+C sends: the watchdog gets it too
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGINT, stderr[-2000:]
    assert "strategy made" not in stdout
    assert "KeyboardInterrupt" not in stderr


SIGTERM_AFTER_STRATEGY = """
import os, signal, time
from tfface.training import distribution
distribution.make_strategy("multi_worker")
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("survived SIGTERM")
"""


def test_a_multi_worker_run_stops_on_sigterm():
    # TensorFlow's coordination service put a handler of its own on SIGTERM
    # that only notes a preemption: the worker ran on until a SIGKILL.
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_AFTER_STRATEGY], env=_worker_env(_local_workers(1), 0), capture_output=True,
        text=True, timeout=120,
    )
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr[-2000:]
    assert "survived" not in result.stdout


def test_mixed_precision_on_a_cpu_warns_and_the_callers_policy_comes_back(tmp_path, caplog):
    from tfface.training.trainer import train

    raw = json.loads(json.dumps(TINY))
    raw["train"].update(epochs=1, mixed_precision="on", output_dir=str(tmp_path / "run"))
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        summary = train(ExperimentConfig.from_dict(raw), verbose=0)
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert summary["mixed_precision"] is True
    assert "train.mixed_precision is on without a GPU" in caplog.text


_MIRRORED_ON_TWO_DEVICES = """
import json
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np

from tfface.config import ModelConfig
from tfface.models.build import build_model
from tfface.schema import get_schema

schema = get_schema("synthetic")
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (16, 32, 32, 3)).astype("float32")
y = {t.name: rng.integers(0, 2 if t.is_binary else t.num_classes, 16).astype("int32") for t in schema}


def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(schema, ModelConfig(image_size=32, backbone_widths=[8, 16, 32, 64], embedding_dim=16,
                                                center_loss_weight=0.0, dropout=0.0))
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    data = tf.data.Dataset.from_tensor_slices(({"image": x}, y)).batch(16)
    loss = model.evaluate(data, verbose=0, return_dict=True)["loss"]
    heads = model.get_layer("task_heads").kernel
    before = heads.numpy()
    model.fit(data, epochs=1, verbose=0)
    return loss, float(np.linalg.norm(heads.numpy() - before))


print(json.dumps([run(tf.distribute.get_strategy()), run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]))
"""


@pytest.mark.slow
def test_two_replicas_log_the_loss_and_step_as_one_device_does():
    done = subprocess.run([sys.executable, "-c", _MIRRORED_ON_TWO_DEVICES], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (one_loss, one_step), (two_loss, two_step) = json.loads(done.stdout.strip().splitlines()[-1])
    # Each replica's loss was not divided by the replica count: twice the loss, twice the step.
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert 0.9 < two_step / one_step < 1.1  # batch normalisation sees 8 images per replica, not 16


_SHARE_SCORES = """
import json, sys
from tfface.training import distribution
strategy = distribution.make_strategy("multi_worker")
mine = json.loads(sys.argv[1])
print("SHARED", json.dumps(distribution.chief_scores(strategy, mine, capacity=6)))
"""


@pytest.mark.slow
def test_a_resumed_multi_worker_run_replays_the_chiefs_history_on_every_worker():
    # Only the chief keeps history.csv; the workers must count early stopping's
    # patience from the same scores, or they stop at different epochs.
    histories = [[0.5, 0.625, 0.55], []]  # the chief's, a worker's (none)
    outputs = _run_two_local_workers(
        lambda index: [sys.executable, "-c", _SHARE_SCORES, json.dumps(histories[index])], timeout=300
    )
    for output in outputs:
        shared = [line for line in output.splitlines() if line.startswith("SHARED ")]
        assert shared and json.loads(shared[-1][len("SHARED "):]) == [0.5, 0.625, 0.55], output[-3000:]


def test_cli_refuses_bad_config_naming_the_key(tmp_path, capsys):
    raw = json.loads(json.dumps(TINY))
    raw["model"]["gate_typo"] = "static"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.gate_typo" in err
    assert not (tmp_path / "run").exists()
    # An empty --output-dir is refused, not taken as "use the config's".
    assert cli_main(["train", "--config", str(_write_config(tmp_path)), "--output-dir", " "]) == 2
    assert "--output-dir is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_missing_config_file(tmp_path, capsys):
    assert cli_main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_a_missing_config_is_named_before_tensorflow_loads_with_a_hint_for_the_example_folders(tmp_path):
    # A fresh process: this one has TensorFlow loaded already.
    script = (
        "import sys; from tfface.cli import main; code = main(sys.argv[1:]); "
        "print('tensorflow' in sys.modules); sys.exit(code)"
    )
    for argv, hint in ((["train", "--config", "configs/nope.yaml"], "example configs/ folder comes with a clone"),
                       (["tune", "--config", "tuning/nope.yaml"], "example tuning/ folder comes with a clone"),
                       (["train", "--config", "nope.yaml"], None)):
        done = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stdout.strip() == "False", (done.stdout, done.stderr)
        assert "nope.yaml" in done.stderr
        assert (hint in done.stderr) if hint else ("clone" not in done.stderr)


def test_cli_version_also_as_python_m_tfface(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tfface {tfface.__version__}"
    done = subprocess.run([sys.executable, "-m", "tfface", "--version"], env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, f"tfface {tfface.__version__}")
    import importlib.metadata

    assert importlib.metadata.version("tfface") == tfface.__version__  # pyproject reads it from the package


def test_cli_errors_are_not_buried_under_tensorflow_load_notices(tmp_path):
    """TensorFlow's C++ library printed 5 lines (oneDNN, CUDA drivers, CPU
    instructions) before every command's own output, errors included."""
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    done = subprocess.run(
        [sys.executable, "-m", "tfface", "query", "--model", "m", "--retries", "0", str(not_an_image)],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {not_an_image} is not an image file (expected one of jpeg, png, gif, bmp, webp, jxl)"]


def test_cli_defaults_are_the_librarys():
    from tfface import cli
    from tfface.export import saved_model
    from tfface.serving import client, server

    assert cli.DEFAULT_MAX_IMAGE_SIDE == saved_model.DEFAULT_MAX_IMAGE_SIDE
    assert cli.DEFAULT_MAX_MESSAGE_BYTES == client.DEFAULT_MAX_MESSAGE_BYTES == server.DEFAULT_MAX_MESSAGE_BYTES


def test_only_expected_tensorflow_load_lines_are_dropped():
    from tfface.cli import _tensorflow_load_notice

    no_driver = "I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n"
    cuinit = "E0000 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)\n"
    onednn = "I0000 port.cc:153] oneDNN custom operations are on. You may see slightly different results\n"
    assert _tensorflow_load_notice(onednn, onednn)
    assert _tensorflow_load_notice(cuinit, no_driver + cuinit)  # a CPU machine: expected
    assert not _tensorflow_load_notice(cuinit, cuinit)  # a driver that fails: news
    assert not _tensorflow_load_notice("W0000 something else entirely\n", onednn + no_driver)


def test_a_missing_dependency_is_one_line_naming_what_to_install(monkeypatch, capsys):
    import importlib

    import tfface.cli

    def needs_keras_tuner(args):
        importlib.import_module("keras_tuner_not_installed")

    monkeypatch.setattr(tfface.cli, "_cmd_tune", needs_keras_tuner)
    monkeypatch.setitem(tfface.cli._PIP_NAMES, "keras_tuner_not_installed", "keras-tuner-x")
    assert cli_main(["tune", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfface tune: error: the Python package 'keras-tuner-x' (module 'keras_tuner_not_installed')")
    assert "`pip install keras-tuner-x`" in err and "Traceback" not in err

    def broken_import_inside_tfface(args):
        importlib.import_module("tfface.no_such_module")

    monkeypatch.setattr(tfface.cli, "_cmd_tune", broken_import_inside_tfface)
    with pytest.raises(ModuleNotFoundError):  # a bug of tfface's own keeps its traceback
        cli_main(["tune", "--config", "x.yaml"])


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("data", "train", "evaluate", "export", "serve", "query", "predict", "tune", "demo"):
        assert command in text


def _subcommand_parsers(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _subcommand_parsers(sub, prefix + (name,))


def test_cli_every_option_says_what_it_is_and_its_default(monkeypatch):
    from tfface.cli import build_parser

    monkeypatch.setenv("COLUMNS", "200")  # no line wrapping in the help checked below
    commands = dict(_subcommand_parsers(build_parser()))
    assert ("data", "generate") in commands and ("serve",) in commands
    for command, parser in commands.items():
        for action in parser._actions:
            if action.dest not in ("help", "func", "command", "data_command"):
                assert action.help, f"tfface {' '.join(command)} {action.dest} has no help"
    serve_help = commands[("serve",)].format_help()
    assert "gRPC port (0: any free port) (default: 8500)" in serve_help
    assert "(default: None)" not in serve_help and "(default: False)" not in serve_help
    assert "same seed, same faces (default: 0)" in commands[("data", "generate")].format_help()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny untrained tfface model, a plain Keras model and a text file,
    each saved as .keras."""
    import keras

    from tfface.config import ModelConfig
    from tfface.models import GatedMultiTaskModel
    from tfface.schema import get_schema

    folder = tmp_path_factory.mktemp("models")
    config = ModelConfig(image_size=32, backbone_widths=(8, 16, 32, 64), embedding_dim=8)
    GatedMultiTaskModel(schema=get_schema("synthetic"), config=config).save(folder / "tiny.keras")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]).save(folder / "plain.keras")
    (folder / "fake.keras").write_text("not a model")
    (folder / "a_file").write_text("")
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "--model", "{m}/tiny.keras", "--name", "123"], "must not be all digits"),
        (["export", "--model", "{m}/tiny.keras", "--name", "ok", "--export-root", "{m}/a_file"], "a_file"),
        (["evaluate", "--model", "{m}/plain.keras", "--data", "synthetic:8", "--out", "{m}/ev"], "not a tfface model"),
        (["evaluate", "--model", "{m}/fake.keras", "--data", "synthetic:8", "--out", "{m}/ev"],
         "fake.keras: not a Keras model file"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(model_files, capsys, argv, message):
    assert cli_main([a.format(m=model_files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (model_files / "ev").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "masks", "synthetic:8", "--count", "0"],
        ["query", "x.jpg", "--model", "m", "--batch-size", "0"],
        ["query", "x.jpg", "--model", "m", "--timeout", "0"],
        ["train", "--config", "c.yaml", "--epochs", "-1"],
    ],
)
def test_cli_refuses_counts_below_one(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "query"])
@pytest.mark.parametrize("version", ["0", "-3", str(2**63), "99999999999999999999"])
def test_cli_refuses_versions_tf_serving_cannot_read_naming_the_option(capsys, command, version):
    """TF Serving reads versions as int64 above 0; `query --version 1e20` used to
    fail in protobuf with a bare "Value out of range"."""
    argv = {"export": ["export", "--model", "m.keras", "--name", "m"], "query": ["query", "x.jpg", "--model", "m"]}
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv[command] + ["--version", version])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--version" in err and f"must be in 1..{2**63 - 1}" in err


@pytest.mark.parametrize("label", ["stable=0", f"stable={2**63}", "stable=x", "=1", ":stable=1"])
def test_cli_refuses_version_labels_tf_serving_cannot_read(capsys, label):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--model-dir", "m", "--version-label", label])
    assert exit_info.value.code == 2
    assert "--version-label: expected [MODEL:]LABEL=VERSION" in capsys.readouterr().err


def test_cli_outputs_never_replace_inputs_or_models(model_files, tmp_path, capsys, monkeypatch):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 40), "gray").save(photos / name)
    originals = {p.name: p.read_bytes() for p in photos.iterdir()}
    model = str(model_files / "tiny.keras")
    model_bytes = (model_files / "tiny.keras").read_bytes()
    refusals = [
        (["predict", str(photos), "--model", model, "--draw", str(photos)], "would overwrite the input image"),
        (["predict", str(photos / "a.png"), "--model", model, "--out", str(photos / "a.png")], "is one of the input images"),
        (["evaluate", "--model", model, "--data", "synthetic:40", "--out", str(tmp_path / "ev"), "--calibrate", model],
         "is the model being evaluated"),
        (["evaluate", "--model", model, "--data", "synthetic:40", "--out", str(tmp_path / "ev"),
          "--calibrate", str(tmp_path / "cal.h5")], "is a .keras file"),
        (["data", "masks", "synthetic:8", "--out", str(tmp_path / "masks.jpg")], "is a PNG file"),
    ]
    for argv, message in refusals:
        assert cli_main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == originals
    assert (model_files / "tiny.keras").read_bytes() == model_bytes
    assert not (tmp_path / "ev").exists() and not (tmp_path / "masks.jpg").exists()

    # A calibrated model goes to its own file, written after the evaluation;
    # the same command again replaces its earlier output and evaluation.
    calibrated = tmp_path / "calibrated.keras"
    argv = ["evaluate", "--model", model, "--data", "synthetic:60", "--out", str(tmp_path / "ev"),
            "--calibrate", str(calibrated)]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["model"]["path"] == model
    from tfface.models.saving import load_model

    assert load_model(calibrated).schema.task_names == load_model(model).schema.task_names
    # --limit cuts the calibration's validation images too.
    capsys.readouterr()
    assert cli_main(argv + ["--limit", "5"]) == 0
    assert re.search(r"calibrated \d+ thresholds on 5 of the \d+ validation images \(--limit\)", capsys.readouterr().out)

    # A config.yaml beside the model (here one that does not parse) only
    # matters to --split and --calibrate, which take the training split from it.
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "model.keras").write_bytes(model_bytes)
    (beside / "config.yaml").write_text("data: [unclosed")
    assert cli_main(["evaluate", "--model", str(beside / "model.keras"), "--data", "synthetic:20",
                     "--out", str(tmp_path / "ev2")]) == 0
    assert cli_main(["evaluate", "--model", str(beside / "model.keras"), "--data", "synthetic:20",
                     "--out", str(tmp_path / "ev3"), "--split", "val"]) == 2
    assert "config.yaml" in capsys.readouterr().err

    # A dataset folder that is taken is refused before any faces are drawn.
    from tfface.data import synthetic

    monkeypatch.setattr(synthetic, "generate_synthetic_faces", lambda *a, **k: pytest.fail("generated first"))
    assert cli_main(["data", "generate", "--out", str(photos)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_demo_replaces_only_an_earlier_demo_run(tmp_path):
    from tfface.demo import _remove_earlier_demo_run

    run = tmp_path / "train"
    run.mkdir()
    (run / "model.keras").write_text("someone's model")
    with pytest.raises(FileExistsError, match="not an earlier demo's run"):
        _remove_earlier_demo_run(run)
    assert (run / "model.keras").read_text() == "someone's model"
    (run / "config.yaml").write_text("name: demo\n")
    _remove_earlier_demo_run(run)
    assert not run.exists()


def test_cli_evaluate_split_follows_the_run_that_trained_the_model(model_files, tmp_path, capsys):
    import shutil

    from tfface.data.sources import open_source
    from tfface.data.splits import split_source

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(model_files / "tiny.keras", run / "model.keras")
    raw = json.loads(json.dumps(TINY))
    raw["data"]["val_fraction"] = 0.5
    raw["data"]["split_seed"] = 7
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    argv = ["evaluate", "--model", str(run), "--data", "synthetic:40", "--split", "val", "--out", str(tmp_path / "ev")]
    # A run of a tfface before 0.2.0 records no split method: its split may
    # differ from today's, so its "validation" images may be training ones.
    assert cli_main(argv) == 2
    assert "records no split method" in capsys.readouterr().err
    (run / "split.json").write_text(json.dumps(split_record(0.5, 7)))
    assert cli_main(argv) == 0
    assert f"val_fraction 0.5, seed 7 ({run / 'config.yaml'})" in capsys.readouterr().out
    expected = split_source(open_source("synthetic:40", image_size=32), val_fraction=0.5, seed=7)["val"]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == len(expected) and metrics["tfface_version"] == tfface.__version__
    (run / "split.json").write_text(json.dumps(dict(split_record(0.5, 7), split_method=2, tfface_version="0.1.0")))
    assert cli_main(argv) == 2
    assert "was split by method 2 (tfface 0.1.0), this tfface splits by method 3" in capsys.readouterr().err


def test_a_resumed_run_keeps_counting_from_its_history(tmp_path):
    from tfface.training.callbacks import ResumedEarlyStopping
    from tfface.training.resume import MONITOR
    from tfface.training.resume import monitored_history

    history = tmp_path / "history.csv"
    history.write_text(f"epoch,loss,{MONITOR}\n0,1.0,0.50\n1,0.9,0.60\n2,0.8,0.55\n3,0.7,0.58\n")
    earlier = monitored_history(history)
    assert earlier == [0.5, 0.6, 0.55, 0.58]
    stopping = ResumedEarlyStopping(earlier, patience=3)
    stopping.on_train_begin()
    assert stopping.best == 0.6 and stopping.wait == 2  # one more epoch without gain stops it


def test_the_resume_and_callback_names_still_import_from_the_trainer_module():
    # They lived in tfface.training.trainer before resuming a run and the
    # callbacks got modules of their own.
    from tfface.training import callbacks
    from tfface.training import resume
    from tfface.training import trainer

    moved = {
        resume: (
            "BACKUP_METADATA", "BACKUP_WEIGHTS", "MONITOR", "RESUMABLE_CHANGES", "SPLIT_FILE", "check_resumable",
            "check_run_split", "read_split_record",
        ),
        callbacks: ("AtomicModelCheckpoint", "BackupSpaceCheck", "ResumedEarlyStopping", "TimeBudget"),
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(trainer, name) is getattr(module, name), name
            assert name in trainer.__all__, name


def test_a_run_folder_with_only_a_config_takes_a_corrected_config(tmp_path):
    from tfface.training.resume import check_resumable

    config = ExperimentConfig.load(_write_config(tmp_path))
    run = Path(config.train.output_dir)
    run.mkdir()
    config.save(run / "config.yaml")  # a first attempt that failed before training
    fixed = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=8))
    check_resumable(run, fixed)  # nothing trained yet: accepted
    (run / "history.csv").write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(ConfigError, match=r"differs in \['data.batch_size'\]"):
        check_resumable(run, fixed)


def test_a_run_started_with_another_split_method_is_not_resumed(tmp_path):
    from tfface.training.resume import check_resumable

    config = ExperimentConfig.load(_write_config(tmp_path))
    run = Path(config.train.output_dir)
    run.mkdir()
    config.save(run / "config.yaml")
    (run / "history.csv").write_text("epoch,loss\n0,1.0\n")  # a run of an older tfface, half done
    with pytest.raises(ConfigError, match=r"records no split method.*train into another train.output_dir"):
        check_resumable(run, config)
    (run / "split.json").write_text(json.dumps(dict(split_record(0.2, config.data.split_seed), split_method=1)))
    with pytest.raises(ConfigError, match=r"was split by method 1 .* other validation images"):
        check_resumable(run, config)
    (run / "split.json").write_text(json.dumps(split_record(0.2, config.data.split_seed)))
    check_resumable(run, config)  # the split it started with: resumed


def test_evaluate_reads_the_split_keys_even_when_the_run_config_does_not_load(tmp_path):
    from tfface.cli import _training_split

    (tmp_path / "config.yaml").write_text("data:\n  schema: schemas/elsewhere.yaml\n  val_fraction: 0.3\n  split_seed: 5\n")
    (tmp_path / "split.json").write_text(json.dumps(split_record(0.3, 5)))
    split = _training_split(tmp_path / "model.keras")
    assert (split["val_fraction"], split["split_seed"]) == (0.3, 5)
    assert _training_split(tmp_path / "nowhere" / "model.keras")["from"] == "defaults"


def test_predict_out_is_replaced_only_by_a_complete_run(model_files, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from tfface import predict

    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "gray").save(photo)
    out = tmp_path / "faces.jsonl"
    out.write_text("earlier results\n")

    def one_then_fail(self, images, names, keep_images):
        yield {"image": str(photo), "faces": [], "error": None}, None
        raise RuntimeError("detector crashed")

    monkeypatch.setattr(predict.FaceAnalyzer, "_run", one_then_fail)
    argv = ["predict", str(photo), "--model", str(model_files / "tiny.keras"), "--out", str(out)]
    with pytest.raises(RuntimeError, match="detector crashed"):
        cli_main(argv)
    assert out.read_text() == "earlier results\n"
    assert json.loads((tmp_path / "faces.jsonl.partial").read_text())["image"] == str(photo)
    assert "results so far are in" in capsys.readouterr().err

    # Running again keeps the first run's partial results under another name.
    first = (tmp_path / "faces.jsonl.partial").read_text()
    with pytest.raises(RuntimeError, match="detector crashed"):
        cli_main(argv)
    assert (tmp_path / "faces.jsonl.partial.1").read_text() == first
    assert (tmp_path / "faces.jsonl.partial").is_file()
    assert "moved from" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill, strategy", [("before_backup", "default"), ("during_backup", "default"), ("during_backup", "mirrored")]
)
def test_a_run_killed_around_its_backup_resumes_with_one_row_per_epoch(tmp_path, monkeypatch, kill, strategy):
    import keras

    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path, epochs=3, strategy=strategy))
    run = Path(config.train.output_dir)
    back_up = keras.callbacks.BackupAndRestore.on_epoch_end

    def killed_at_second_epoch(self, epoch, logs=None):
        if epoch == 1 and kill == "before_backup":
            raise KeyboardInterrupt("killed after the history row, before the backup")
        back_up(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", killed_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, verbose=0)
    monkeypatch.undo()
    assert _epochs_logged(run) == [0, 1]
    if kill == "during_backup":
        newest = run / "backup" / "latest.weights.h5"
        assert (run / "backup" / "latest.weights.h5.bkp").is_file()
        newest.write_bytes(newest.read_bytes()[:1000])  # cut short: the previous backup is used

    summary = train(config, verbose=0)
    # Resumed from the first epoch's backup: the second epoch is done again
    # and logged once.
    assert _epochs_logged(run) == [0, 1, 2]
    assert summary["epochs_run"] == 3  # the whole run
    assert len(summary["history"]["loss"]) == 2  # this call: epochs 2 and 3


_MULTI_WORKER_KILLED_BEFORE_BACKUP = """
import csv, json, os, sys
import keras
from tfface.config import ExperimentConfig
from tfface.training.trainer import train
config = ExperimentConfig.load(sys.argv[1])
back_up = keras.callbacks.BackupAndRestore.on_epoch_end

def killed_at_second_epoch(self, epoch, logs=None):
    if epoch == 1:
        raise KeyboardInterrupt("killed after the history row, before the backup")
    back_up(self, epoch, logs)

keras.callbacks.BackupAndRestore.on_epoch_end = killed_at_second_epoch
try:
    train(config, verbose=0)
except KeyboardInterrupt:
    pass
keras.callbacks.BackupAndRestore.on_epoch_end = back_up
def logged():
    with open(os.path.join(config.train.output_dir, "history.csv")) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]
print("KILLED", json.dumps(logged()))
train(config, verbose=0)
print("RESUMED", json.dumps(logged()))
"""


@pytest.mark.slow
def test_a_multi_worker_run_killed_before_its_backup_resumes_with_one_row_per_epoch(tmp_path):
    # The single-process resume trims history.csv; a multi-worker chief kept
    # the row of the epoch it then trained again (logged twice).
    config = _write_config(tmp_path, epochs=3, strategy="multi_worker")
    done = subprocess.run([sys.executable, "-c", _MULTI_WORKER_KILLED_BEFORE_BACKUP, str(config)],
                          env=_worker_env(_local_workers(1), 0), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("KILLED", "RESUMED")))
    assert json.loads(lines["KILLED"]) == [0, 1]
    assert json.loads(lines["RESUMED"]) == [0, 1, 2]


@pytest.mark.slow
def test_a_run_killed_after_its_last_epoch_writes_its_summary_without_training_again(tmp_path, monkeypatch):
    from tfface.training import trainer

    config = ExperimentConfig.load(_write_config(tmp_path, epochs=1))
    run = Path(config.train.output_dir)
    real_write = trainer.write_atomic

    def killed_before_the_summary(path, *args, **kwargs):
        if Path(path).name == "train_summary.json":
            raise KeyboardInterrupt("killed")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(trainer, "write_atomic", killed_before_the_summary)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, verbose=0)
    monkeypatch.undo()
    finished = (run / "model.keras").read_bytes()
    summary = trainer.train(config, verbose=0)
    assert summary["epochs_run"] == 1 and summary["history"] == {}  # nothing trained again
    assert (run / "model.keras").read_bytes() == finished
    assert _epochs_logged(run) == [0]
    assert (run / "train_summary.json").is_file() and not (run / "backup").exists()
    with pytest.raises(ConfigError, match="holds a finished run"):
        trainer.train(config, verbose=0)


@pytest.mark.slow
def test_a_run_early_stopping_had_ended_is_not_trained_further_on_resume(tmp_path, monkeypatch):
    from tfface.training.callbacks import ResumedEarlyStopping
    from tfface.training.resume import MONITOR
    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path, epochs=3, early_stopping_patience=1))
    run = Path(config.train.output_dir)
    _kill_after_backup_of(1, monkeypatch)
    # The tiny model's real scores could stop it before the kill.
    monkeypatch.setattr(ResumedEarlyStopping, "on_epoch_end", lambda self, epoch, logs=None: None)
    with pytest.raises(KeyboardInterrupt):
        train(config, verbose=0)
    monkeypatch.undo()
    # Scores that had spent the patience at the second epoch: Keras stopped
    # the run there, and only the kill kept it from writing its summary.
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, score in zip(rows, ("0.6", "0.5")):
        row[MONITOR] = score
    with open(run / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = train(config, verbose=0)
    assert (summary["epochs_run"], summary["stopped_by"]) == (2, "early_stopping")
    assert _epochs_logged(run) == [0, 1]


def _run_folder(config, summary=None):
    """A run folder with its config, split record and a backup of 2 epochs."""
    run = Path(config.train.output_dir)
    (run / "backup").mkdir(parents=True)
    config.save(run / "config.yaml")
    (run / "split.json").write_text(json.dumps(split_record(config.data.val_fraction, config.data.split_seed)))
    (run / "backup" / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    if summary:
        (run / "train_summary.json").write_text(json.dumps(summary))
    return run


def test_an_unreadable_backup_is_named_and_left_in_place(tmp_path):
    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path))
    run = _run_folder(config)  # an epoch was backed up
    (run / "backup" / "latest.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(ConfigError, match="resume backup in .*backup cannot be read"):
        train(config, verbose=0)
    assert (run / "backup" / "latest.weights.h5").read_bytes() == b"not hdf5"


def _weights_file(path, seed):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(64), keras.layers.Dense(64)])
    model.layers[0].kernel.assign(np.full((4, 64), seed, "float32"))
    model.save_weights(path.parent / "written.weights.h5")  # Keras wants that suffix
    (path.parent / "written.weights.h5").rename(path)
    return path.read_bytes()


@pytest.mark.parametrize("damage, keep", [("cut", 0.6), ("zeroed", 0.1), ("zeroed", 0.3), ("zeroed", 0.95)])
def test_a_backup_cut_short_falls_back_to_the_one_before_whatever_h5py_raises(tmp_path, damage, keep):
    # A kill cuts the newest backup short (Keras's load raises OSError and
    # Keras falls back itself); a full disk leaves it at length with its
    # end unwritten, and the load raises RuntimeError, KeyError or
    # ValueError, on which Keras does not fall back.
    from tfface.training.resume import readable_weights
    from tfface.training.resume import settle_backup

    backup = tmp_path / "backup"
    backup.mkdir()
    latest, earlier = backup / "latest.weights.h5", backup / "latest.weights.h5.bkp"
    _weights_file(latest, 2.0)
    _weights_file(earlier, 1.0)
    (backup / "training_metadata.json").write_text('{"epoch": 2, "batch": 0}')
    (backup / "training_metadata.json.bkp").write_text('{"epoch": 1, "batch": 0}')
    whole = latest.read_bytes()
    kept = int(len(whole) * keep)
    latest.write_bytes(whole[:kept] + (bytes(len(whole) - kept) if damage == "zeroed" else b""))
    assert not readable_weights(latest) and readable_weights(earlier)
    settle_backup(backup)
    assert latest.read_bytes() == earlier.read_bytes()
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1


def test_a_backup_whose_metadata_a_kill_emptied_falls_back_to_the_one_before(tmp_path):
    from tfface.training.resume import settle_backup

    backup = tmp_path / "backup"
    backup.mkdir()
    latest, earlier = backup / "latest.weights.h5", backup / "latest.weights.h5.bkp"
    _weights_file(latest, 2.0)
    _weights_file(earlier, 1.0)
    (backup / "training_metadata.json").write_text("")  # Keras opens it with "w", then writes
    (backup / "training_metadata.json.bkp").write_text('{"epoch": 1, "batch": 0}')
    settle_backup(backup)  # it used to be refused, with the advice to remove the whole backup
    assert latest.read_bytes() == earlier.read_bytes()
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1


def test_a_resumed_run_draws_its_data_from_a_seed_of_its_own(tmp_path, monkeypatch):
    from tfface.training import trainer

    seeds = []
    make = trainer.make_datasets

    def recording(*args, seed=None, **kwargs):
        seeds.append(seed)
        return make(*args, seed=seed, **kwargs)

    monkeypatch.setattr(trainer, "make_datasets", recording)
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(epochs=3, output_dir=str(tmp_path / "run"), time_budget_minutes=0.0001, seed=5)
    trainer.train(ExperimentConfig.from_dict(raw), verbose=0)  # stopped by its budget after epoch 1
    raw["train"]["time_budget_minutes"] = 30
    summary = trainer.train(ExperimentConfig.from_dict(raw), verbose=0)
    assert summary["epochs_run"] == 3 and _epochs_logged(tmp_path / "run") == [0, 1, 2]
    # Same seed again: the continuation replayed epoch 0's order and augmentation.
    assert seeds == [5, 6]


def test_a_first_backup_cut_short_starts_the_run_again(tmp_path):
    from tfface.training.resume import settle_backup

    backup = tmp_path / "backup"
    backup.mkdir()
    _weights_file(backup / "latest.weights.h5", 1.0)
    whole = (backup / "latest.weights.h5").read_bytes()
    (backup / "latest.weights.h5").write_bytes(whole[: len(whole) // 2])  # killed before its metadata
    settle_backup(backup)
    assert not backup.exists()
    # A readable backup is left alone.
    backup.mkdir()
    readable = _weights_file(backup / "latest.weights.h5", 1.0)
    settle_backup(backup)
    assert (backup / "latest.weights.h5").read_bytes() == readable


def test_a_finished_run_whose_backup_a_kill_left_is_still_finished(tmp_path):
    from tfface.training.resume import check_resumable

    config = ExperimentConfig.load(_write_config(tmp_path))
    run = _run_folder(config, {"stopped_by": "epochs", "history": {"loss": [1.0, 0.5]}})
    with pytest.raises(ConfigError, match="holds a finished run"):
        check_resumable(run, config)
    # Its time budget keeps a run's backup on purpose: that run continues.
    (run / "train_summary.json").write_text(json.dumps({"stopped_by": "time_budget"}))
    check_resumable(run, config)


def test_a_run_being_trained_is_not_trained_by_a_second_process(tmp_path):
    from tfface.atomic_files import FolderBusyError
    from tfface.atomic_files import folder_lock
    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path))
    run = _run_folder(config)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with folder_lock(run):  # what the running `tfface train` holds
        with pytest.raises(FolderBusyError, match="is being trained by another process"):
            train(config, verbose=0)
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_output_dir_that_is_a_file_or_a_missing_weights_file_is_named_before_writing(tmp_path):
    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path))
    (tmp_path / "run").write_text("notes")
    with pytest.raises(ConfigError, match="train.output_dir .*run is a file, not a folder"):
        train(config, verbose=0)
    assert (tmp_path / "run").read_text() == "notes"
    config.train.output_dir = str(tmp_path / "new_run")
    config.model.backbone, config.model.backbone_weights = "mobilenet_v3_small", str(tmp_path / "missing.h5")
    with pytest.raises(ConfigError, match="model.backbone_weights: file not found: .*missing.h5"):
        train(config, verbose=0)
    assert not (tmp_path / "new_run").exists()


@pytest.mark.slow
def test_mask_pretraining_trains_the_predictor_first_and_keeps_it_frozen(tmp_path, monkeypatch):
    from tfface.models import mask_predictor
    from tfface.training.trainer import train

    raw = json.loads(json.dumps(TINY))
    raw["model"].update(type="mask_guided", mask_channels=[8, 16, 32], mask_trainable=False)
    raw["train"].update(epochs=2, mask_pretrain_epochs=1, output_dir=str(tmp_path / "run"))
    config = ExperimentConfig.from_dict(raw)
    pretrained = {"calls": 0}
    original = mask_predictor.pretrain_mask_predictor

    def recording(model, *args, **kwargs):
        history = original(model, *args, **kwargs)
        pretrained["weights"] = [w.copy() for w in model.get_layer("mask_predictor").get_weights()]
        pretrained["freeze"] = kwargs["freeze"]
        pretrained["calls"] += 1
        return history

    monkeypatch.setattr(mask_predictor, "pretrain_mask_predictor", recording)
    # Killed after the first attribute epoch, then resumed: the pretraining
    # is not done again, and the summary still records it.
    back_up = keras.callbacks.BackupAndRestore.on_epoch_end
    _kill_after_backup_of(0, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config, verbose=0)
    monkeypatch.setattr(keras.callbacks.BackupAndRestore, "on_epoch_end", back_up)
    summary = train(config, verbose=0)
    assert pretrained["calls"] == 1 and summary["epochs_run"] == 2
    assert pretrained["freeze"] is True
    assert summary["mask_pretraining"]["epochs"] == 1 and summary["mask_pretraining"]["frozen"]
    assert len(summary["mask_pretraining"]["history"]["mask_iou"]) == 1
    saved = keras.models.load_model(Path(summary["output_dir"]) / "model.keras")
    predictor = saved.get_layer("mask_predictor")
    assert predictor.trainable_weights == [] and not saved.model_config.mask_trainable
    # The attribute epoch left the pretrained predictor (BN statistics included) as it was.
    for before, after in zip(pretrained["weights"], predictor.get_weights()):
        np.testing.assert_array_equal(after, before)


def test_a_corrupt_image_met_during_mask_pretraining_is_named(tmp_path, monkeypatch):
    # Only the attribute training named a file that did not decode; the
    # mask pretraining stopped with TensorFlow's bare "Invalid PNG data".
    import tensorflow as tf

    from tfface.data.source import DataError
    from tfface.training import trainer

    raw = json.loads(json.dumps(TINY))
    raw["model"].update(type="mask_guided", mask_channels=[8, 16, 32], mask_trainable=False)
    raw["train"].update(epochs=1, mask_pretrain_epochs=1, output_dir=str(tmp_path / "run"))

    def undecodable(*args, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "[corrupt or truncated image file: /faces/000007.png]")

    monkeypatch.setattr(trainer, "pretrain_masks", undecodable)
    with pytest.raises(DataError, match=r"corrupt or truncated image file: /faces/000007.png; fix or remove it"):
        trainer.train(ExperimentConfig.from_dict(raw), verbose=0)


@pytest.mark.parametrize(
    "model, train_keys, message",
    [
        ({"type": "mask_guided", "mask_trainable": False}, {}, r"mask_trainable: false freezes the mask predictor"),
        ({"type": "gated"}, {"mask_pretrain_epochs": 2}, r"mask_pretrain_epochs trains the mask predictor"),
        ({"type": "mask_guided", "fusion": "global"}, {"mask_pretrain_epochs": 2}, r"fusion 'global'\) has none"),
        ({"type": "mask_guided"}, {"mask_pretrain_epochs": -1}, r"train.mask_pretrain_epochs must be >= 0"),
    ],
)
def test_a_mask_schedule_that_cannot_train_the_predictor_is_refused(model, train_keys, message):
    raw = json.loads(json.dumps(TINY))
    raw["model"].update(model, mask_channels=[8, 16, 32])
    raw["train"].update(train_keys)
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict(raw)


def test_a_split_that_leaves_one_side_empty_is_named(tmp_path):
    from tfface.training.trainer import load_sources

    raw = json.loads(json.dumps(TINY))
    raw["data"].update(sources=[{"path": "synthetic:20"}], val_fraction=0.99)
    config = ExperimentConfig.from_dict(raw)
    with pytest.raises(ConfigError, match=r"synthetic:20: the split by person \(data.val_fraction 0.99\) leaves no train images of 20"):
        load_sources(config.data)


def _synthetic_folder_with_bad_images(tmp_path, n=160):
    from tfface.data.synthetic import generate_synthetic_faces
    from tfface.data.synthetic import write_synthetic_folder

    folder = write_synthetic_folder(generate_synthetic_faces(n, image_size=32), tmp_path / "faces")
    victims = sorted((folder / "images").iterdir())[5:7]
    victims[0].write_bytes(b"")
    data = victims[1].read_bytes()
    victims[1].write_bytes(data[:40] + bytes(len(data) - 40))
    return folder, victims


def test_skip_bad_images_trains_on_the_rest_and_a_stopped_run_resumes_with_it(tmp_path):
    from tfface.data.source import DataError
    from tfface.training.trainer import train

    folder, victims = _synthetic_folder_with_bad_images(tmp_path)
    raw = json.loads(json.dumps(TINY))
    raw["data"]["sources"] = [{"path": str(folder)}]
    raw["train"].update(epochs=1, output_dir=str(tmp_path / "run"))
    with pytest.raises(DataError, match=rf"{victims[0].name}.*--skip-bad-images"):
        train(ExperimentConfig.from_dict(raw), verbose=0)
    raw["data"]["sources"][0]["skip_bad_images"] = True
    summary = train(ExperimentConfig.from_dict(raw), verbose=0)
    (problem,) = summary["sources"][0]["problems"]
    assert "left out 2 of 160 image(s) that do not decode" in problem
    assert all(str(victim) in problem for victim in victims)
    assert summary["train_examples"] + summary["val_examples"] == 158


def test_a_resume_may_turn_on_skip_bad_images_but_not_change_the_data(tmp_path):
    from tfface.training.resume import check_resumable

    raw = json.loads(json.dumps(TINY))
    raw["train"]["output_dir"] = str(tmp_path / "run")
    run = _run_folder(ExperimentConfig.from_dict(raw))
    raw["data"]["sources"][0]["skip_bad_images"] = True
    check_resumable(run, ExperimentConfig.from_dict(raw))
    raw["data"]["sources"][0]["skip_bad_rows"] = True
    with pytest.raises(ConfigError, match=r"differs in \['data.sources.0.skip_bad_rows'\]"):
        check_resumable(run, ExperimentConfig.from_dict(raw))


def test_the_time_budget_counts_the_mask_pretraining():
    from tfface.training.callbacks import TimeBudget

    class Model:
        stop_training = False

    def budget_after_one_epoch(spent_seconds):
        budget = TimeBudget(1.0, spent_seconds=spent_seconds)
        budget.set_model(Model())
        budget.set_params({"epochs": 5})
        budget.on_train_begin()
        budget.on_epoch_end(0)
        return budget.stopped

    assert not budget_after_one_epoch(0.0)
    assert budget_after_one_epoch(61.0)  # the pretraining alone spent the minute


def test_a_mask_guided_run_needs_landmarks_to_supervise_its_masks(tmp_path, caplog):
    from tfface.training.trainer import check_mask_supervision
    from tfface.training.trainer import load_sources
    from tfface.training.trainer import train

    folder = tmp_path / "faces"
    assert cli_main(["data", "generate", "--out", str(folder), "--num-images", "40", "--image-size", "32"]) == 0
    landmarks = folder / "landmarks.csv"
    lines = landmarks.read_text().splitlines()
    raw = json.loads(json.dumps(TINY))
    raw["data"]["sources"] = [{"path": str(folder)}]
    raw["model"].update(type="mask_guided", mask_channels=[8, 16, 32])
    raw["train"].update(epochs=1, steps_per_epoch=2, output_dir=str(tmp_path / "run"))
    config = ExperimentConfig.from_dict(raw)

    landmarks.unlink()  # moved away from its landmarks: the masks would learn nothing
    with pytest.raises(ConfigError, match=r"none of the \d+ training images has any .*tfface data annotate"):
        train(config, verbose=0)
    assert not (tmp_path / "run").exists()

    # Half without: a warning with the counts, which the summary records.
    rows = [row if n % 2 else row.split(",")[0] + "," * 10 for n, row in enumerate(lines[1:])]
    landmarks.write_text("\n".join([lines[0], *rows]) + "\n")
    train_sources, _ = load_sources(config.data)
    with caplog.at_level("WARNING", logger="tfface.training.trainer"):
        coverage = check_mask_supervision(config, train_sources)[0]
    assert 0 < coverage["with_landmarks"] < coverage["train_examples"] == len(train_sources[0])
    assert f"{coverage['with_landmarks']} of {coverage['train_examples']} training images have landmarks" in caplog.text
    gated = dataclasses.replace(config, model=dataclasses.replace(config.model, type="gated"))
    assert check_mask_supervision(gated, train_sources) is None  # no masks to supervise


@pytest.mark.slow
def test_a_deterministic_run_repeats_bit_for_bit(tmp_path):
    # In subprocesses: op determinism is process-wide and cannot be undone.
    config = _write_config(tmp_path, epochs=1, steps_per_epoch=4, deterministic=True)
    script = (
        "import sys\n"
        "from tfface.config import ExperimentConfig\n"
        "from tfface.training.trainer import train\n"
        "for run in sys.argv[2:]:\n"
        "    config = ExperimentConfig.load(sys.argv[1])\n"
        "    config.train.output_dir = run\n"
        "    train(config, verbose=0)\n"
    )
    runs = [tmp_path / "a", tmp_path / "b"]
    subprocess.run(
        [sys.executable, "-c", script, str(config), *map(str, runs)],
        check=True, env=_env(), capture_output=True, timeout=600,
    )
    histories = [(run / "history.csv").read_text() for run in runs]
    assert histories[0] == histories[1] and "val_mean_balanced_accuracy" in histories[0]


@pytest.mark.slow
def test_a_model_save_that_fails_leaves_the_models_of_earlier_epochs_whole(tmp_path, monkeypatch):
    # A full disk or a kill during a save: Keras's ModelCheckpoint wrote into
    # last.keras and model.keras, destroying the best model of the epochs before.
    import errno
    import zipfile

    from tfface.training.trainer import train

    config = ExperimentConfig.load(_write_config(tmp_path, epochs=3))
    run = Path(config.train.output_dir)
    save = keras.Model.save
    calls = []

    def disk_full_from_the_second_epoch(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) > 2:  # epoch 1 saved last.keras and model.keras
            Path(filepath).write_bytes(b"PK\x03\x04 cut short")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", disk_full_from_the_second_epoch)
    with pytest.raises(OSError, match="No space left"):
        train(config, verbose=0)
    monkeypatch.undo()
    assert _epochs_logged(run) == [0, 1]
    first = {}
    for name in ("last.keras", "model.keras"):
        assert zipfile.is_zipfile(run / name), name
        first[name] = tfface.models.load_model(run / name).get_weights()
    assert not [p.name for p in run.iterdir() if p.name.startswith((".last.keras", ".model.keras"))]

    # A kill leaves the temporary file of the save; the next run removes it.
    (run / ".last.keras.abc123.tmp.keras").write_bytes(b"PK\x03\x04 killed")
    summary = train(config, verbose=0)
    assert summary["epochs_run"] == 3
    assert not (run / ".last.keras.abc123.tmp.keras").exists()
    last = tfface.models.load_model(run / "last.keras").get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(first["last.keras"], last))


def test_the_best_model_checkpoint_saves_only_a_better_score(tmp_path):
    from tfface.training.callbacks import AtomicModelCheckpoint

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    path = tmp_path / "model.keras"
    first = AtomicModelCheckpoint(path, monitor="val_score")
    first.set_model(model)
    first.on_epoch_end(0, {"val_score": float("nan")})  # a diverged first epoch is no best
    assert not path.exists() and first.best is None
    checkpoint = AtomicModelCheckpoint(path, monitor="val_score", initial_value_threshold=0.5)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_score": 0.4})  # below the earlier run's best
    assert not path.exists()
    checkpoint.on_epoch_end(1, {"val_score": 0.6})
    saved = path.read_bytes()
    model.layers[0].kernel.assign(np.ones((2, 1), "float32"))
    checkpoint.on_epoch_end(2, {"val_score": 0.6})  # a tie is no better
    checkpoint.on_epoch_end(3, {"val_score": float("nan")})
    checkpoint.on_epoch_end(4, {"loss": 1.0})  # not logged: nothing saved
    assert path.read_bytes() == saved
    checkpoint.on_epoch_end(5, {"val_score": 0.7})
    assert np.array_equal(keras.saving.load_model(path).get_weights()[0], np.ones((2, 1)))


_FILL_THE_DISK_BEFORE_THE_BACKUP = """
import os, sys
from tfface.cli import main
from tfface.training import callbacks

check = callbacks.BackupSpaceCheck.on_epoch_end

def full_disk(self, epoch, logs=None):
    disk = os.statvfs(self.backup_dir.parent)
    with open(sys.argv[2], "wb") as ballast:  # leaves 64 KiB, less than the backup
        ballast.write(bytes(max(disk.f_bavail * disk.f_frsize - 65536, 0)))
    return check(self, epoch, logs)

callbacks.BackupSpaceCheck.on_epoch_end = full_disk
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_disk_that_fills_during_the_backup_is_one_error_line_and_the_rerun_recovers(tmp_path):
    # HDF5 crashed the process (exit 139) when the disk filled in the middle
    # of the backup; the room is checked before it is written.
    with small_disk(tmp_path / "disk", "64m") as disk:
        config = _write_config(tmp_path, epochs=2, output_dir=str(disk / "run"))
        ballast = disk / "ballast"
        full = subprocess.run(
            [sys.executable, "-c", _FILL_THE_DISK_BEFORE_THE_BACKUP, str(config), str(ballast)],
            env=_env(), capture_output=True, text=True, timeout=400,
        )
        assert full.returncode == 2, full.stderr[-2000:]
        assert "tfface train: error: [Errno 28] not enough free space for the resume backup" in full.stderr
        assert "Traceback" not in full.stderr
        assert _epochs_logged(disk / "run") == [0] and (disk / "run" / "last.keras").is_file()
        ballast.unlink()
        again = subprocess.run(
            [sys.executable, "-m", "tfface.cli", "train", "--config", str(config)],
            env=_env(), capture_output=True, text=True, timeout=400,
        )
        assert again.returncode == 0, again.stderr[-2000:]
        assert _epochs_logged(disk / "run") == [0, 1]


def test_tensorflow_errors_are_shown_as_tensorflows_own_words():
    # The CLI printed the whole error: the Python frames where the op was
    # defined, the node and a GPU-memory hint around the one line that says
    # what happened.
    import tensorflow as tf

    from tfface.tf_errors import tensorflow_error_text

    missing = "/nonexistent/tfface/face.jpg"
    with pytest.raises(tf.errors.NotFoundError) as failed:
        tf.function(lambda: tf.io.read_file(missing))()
    assert "{{function_node" in str(failed.value) and "[Op:" in str(failed.value)
    assert tensorflow_error_text(failed.value) == f"{missing}; No such file or directory"
    # As model.fit raised it when the image cache's disk filled (frames shortened):
    fit_error = tf.errors.ResourceExhaustedError(None, None, (
        "Graph execution error:\n\nDetected at node IteratorGetNext defined at (most recent call last):\n"
        '  File "<frozen runpy>", line 198, in _run_module_as_main\n\n'
        '  File "/x/trainer.py", line 154, in multi_step_on_iterator\n\n'
        "/cache/images/run-1/source0_0.data-00000-of-00001.tempstate127; No space left on device\n"
        "\t [[{{node IteratorGetNext}}]]\nHint: If you want to see a list of allocated tensors when OOM happens, "
        "add report_tensor_allocations_upon_oom to RunOptions for current allocation info.\n"
        " [Op:__inference_multi_step_on_iterator_6816]"
    ))
    assert tensorflow_error_text(fit_error) == (
        "/cache/images/run-1/source0_0.data-00000-of-00001.tempstate127; No space left on device"
    )


def test_only_the_caches_own_failures_are_called_cache_failures():
    # Every error below the cache names it in its chain of iterators; a
    # corrupt image was first taken for a cache failure.
    import tensorflow as tf

    from tfface.data.pipeline import _is_cache_failure

    cut_short = ('Iterator "Iterator::Root::Prefetch::FiniteTake::MapAndBatch::ShuffleAndRepeat::FileCacheImpl" '
                 "returned `OutOfRange`. This indicates an implementation error")
    below = ("Error in user-defined function passed to ParallelMapDatasetV2:581 transformation with iterator: "
             "Iterator::Root::Prefetch::MemoryCacheImpl::ParallelMapV2: assertion failed: [empty image file: x.png]")
    assert _is_cache_failure(tf.errors.InternalError(None, None, cut_short))
    assert not _is_cache_failure(tf.errors.InvalidArgumentError(None, None, below))


@pytest.mark.slow
def test_a_cache_disk_that_fills_is_one_error_line_that_says_what_to_do(tmp_path):
    # It was 35 lines of TensorFlow ending in a "tempstate" file name and a
    # hint about GPU memory.
    with small_disk(tmp_path / "cache", "200k") as cache:
        raw = json.loads(json.dumps(TINY))
        raw["data"]["cache"] = "disk"
        raw["train"].update(epochs=1, output_dir=str(tmp_path / "run"))
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        done = subprocess.run(
            [sys.executable, "-m", "tfface.cli", "train", "--config", str(config)],
            env=dict(_env(), TFFACE_CACHE_DIR=str(cache)), capture_output=True, text=True, timeout=400,
        )
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("tfface train: error: the decoded-image cache failed ("), errors
    assert "No space left on device" in errors[0] and "or set data.cache: none" in errors[0]
    assert "Detected at node" not in done.stderr and "Hint:" not in done.stderr


def test_paths_of_the_wrong_kind_are_named(tmp_path, capsys):
    # mkdir said "[Errno 17] File exists" or "[Errno 20] Not a directory" for a
    # file in the way of an output folder, and a config path that is a folder
    # was "not found".
    import errno

    from tfface.cli import _check_new_model_file
    from tfface.cli import _error_text

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    assert cli_main(["data", "generate", "--out", str(blocker / "faces"), "--num-images", "4"]) == 2
    assert f"error: {blocker} is a file, where a folder is needed" in capsys.readouterr().err
    deeper = NotADirectoryError(errno.ENOTDIR, "Not a directory", str(blocker / "x" / "y"))
    assert _error_text(deeper) == f"cannot make the folder for {blocker / 'x' / 'y'}: {blocker} is a file, not a folder"
    assert cli_main(["train", "--config", str(tmp_path)]) == 2
    assert f"error: {tmp_path} is a folder, not a config file: name the file" in capsys.readouterr().err
    model = tmp_path / "model.keras"
    with pytest.raises(NotADirectoryError, match=f"--calibrate {blocker}/c.keras: {blocker} is a file, not a folder"):
        _check_new_model_file(blocker / "c.keras", model)
    with pytest.raises(IsADirectoryError, match="is a folder; name the .keras file"):
        (tmp_path / "c.keras").mkdir()
        _check_new_model_file(tmp_path / "c.keras", model)
