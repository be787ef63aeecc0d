"""The `tf.distribute` strategy of a run and its multi-worker cluster.

Apart from the trainer because TensorFlow's multi-worker start-up is full of
traps of its own (a wait that cannot be interrupted, a SIGTERM handler that
stays, logs that do not average): the code that works around them is easier
to read, and to trust, with nothing else around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfface.config import ConfigError

log = logging.getLogger(__name__)


def make_strategy(name, cluster_wait_minutes=None):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        tf_config = read_tf_config()  # named here, before TensorFlow's own less clear errors
        log_cluster_wait(tf_config, cluster_wait_minutes)
        with _signals_kept_for_cluster_wait():
            return _wait_for_cluster(tf_config, cluster_wait_minutes)
    return tf.distribute.get_strategy()


# Run in a child process: it ends a worker still waiting at the deadline.
# The parent closes the child's stdin when the wait is over; a parent that
# dies closes it too, so the child never outlives its worker.
_CLUSTER_WAIT_WATCHDOG = """
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl+C ends the worker, and with it this watchdog
parent, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], seconds)[0]:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGKILL)
"""


def _wait_for_cluster(tf_config, minutes):
    """Makes the multi-worker strategy, which blocks until every worker has
    started; with `minutes`, a worker still waiting then is ended.

    TensorFlow waits with no time limit on worker 0, holding the GIL and
    with its own SIGTERM handler in place: nothing in this process can stop
    the wait, so a watchdog process ends it (SIGKILL, after saying why)
    instead of the worker hanging until someone kills it.
    """
    if minutes is None:
        return tf.distribute.MultiWorkerMirroredStrategy()
    task = tf_config["task"]
    message = (
        f"tfface: error: multi_worker: {task['type']} {task['index']} waited {minutes:g} min "
        f"(train.cluster_wait_minutes) for the other workers of TF_CONFIG's cluster ({_other_members(tf_config)}) "
        "to start the same command; they did not, so this worker is stopped (SIGKILL: TensorFlow's wait cannot be "
        "interrupted). Start every worker, check their addresses, or raise train.cluster_wait_minutes (null: no limit)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _CLUSTER_WAIT_WATCHDOG, str(os.getpid()), str(minutes * 60), message],
        stdin=subprocess.PIPE,
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        watchdog.stdin.close()
        watchdog.wait()


@contextlib.contextmanager
def _signals_kept_for_cluster_wait():
    """Ctrl+C ends a worker waiting for its cluster, and SIGTERM works again
    once the wait is over.

    While TensorFlow waits it holds the GIL, so Python's own Ctrl+C handler
    never ran: the default action (end the process; nothing is written yet)
    is put in its place for the wait. TensorFlow's coordination service
    also replaces the SIGTERM handler with a preemption notice of its own
    (which tfface does not read): that is undone after the wait, or a
    multi-worker run ignored SIGTERM (a cluster manager's stop, `timeout`)
    for its whole life.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _other_members(tf_config) -> str:
    task = tf_config["task"]
    others = [
        f"{job} {i} ({address})" for job, i, address in cluster_members(tf_config)
        if (job, i) != (task["type"], task["index"])
    ]
    return ", ".join(others) or "no other worker"


def log_cluster_wait(tf_config, minutes=None) -> None:
    """Says what a worker waits for before TensorFlow blocks on it: its own
    "waiting for tasks" lines are below the CLI's log level, so a worker
    whose peer never starts (a wrong address in TF_CONFIG) looked hung."""
    task = tf_config["task"]
    limit = "no time limit" if minutes is None else f"up to {minutes:g} min, train.cluster_wait_minutes"
    log.info(
        "multi_worker: %s %d of %d waiting for %s to start the same command (%s; Ctrl+C or SIGKILL stops a "
        "worker while it waits, SIGTERM does not)",
        task["type"], task["index"], len(cluster_members(tf_config)), _other_members(tf_config), limit,
    )


def read_tf_config() -> dict:
    """The cluster of a multi-worker run, from $TF_CONFIG, checked."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise ConfigError(
            "train.strategy 'multi_worker' needs the TF_CONFIG environment variable (JSON with 'cluster' and "
            "'task'), set on every worker"
        )
    try:
        tf_config = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e})") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not isinstance(cluster, dict) or not any(isinstance(cluster.get(k), list) and cluster[k] for k in ("chief", "worker")):
        raise ConfigError('TF_CONFIG has no "cluster" with a list of "worker" (or "chief") addresses')
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) or not isinstance(task.get("index"), int):
        raise ConfigError('TF_CONFIG has no "task" with a "type" ("worker" or "chief") and an integer "index"')
    addresses = cluster.get(task["type"])
    if not isinstance(addresses, list) or not 0 <= task["index"] < len(addresses):
        raise ConfigError(
            f"TF_CONFIG's task {task['type']} {task['index']} is not in its cluster "
            f"({len(addresses) if isinstance(addresses, list) else 0} {task['type']} address(es))"
        )
    return tf_config


def chief_scores(strategy, scores, capacity: int) -> list:
    """The chief's `scores` (at most `capacity`) on every worker.

    An all-reduce to which only the chief's replicas contribute, each an
    equal share: workers have no history of their own to read.
    """
    values = np.zeros(capacity + 1, np.float64)
    if is_chief("multi_worker"):
        scores = list(scores)[-capacity:]
        values[0] = len(scores)
        values[1 : 1 + len(scores)] = scores
    share = tf.constant(values / len(strategy.extended.worker_devices))

    @tf.function
    def all_reduce():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", share))

    shared = strategy.experimental_local_results(all_reduce())[0].numpy()
    return [float(v) for v in shared[1 : 1 + int(round(shared[0]))]]


def cluster_members(tf_config) -> list:
    """(job, index, address) of the chief and every worker of a TF_CONFIG."""
    cluster = tf_config["cluster"]
    return [(job, i, address) for job in ("chief", "worker") for i, address in enumerate(cluster.get(job) or [])]


def rank_one_logs(model):
    """Keras 3 averages each step's logs across workers with `axis=0`, which
    fails on scalars (tensorflow/tensorflow#72388); shape (1,) logs average
    to the same scalar. Only for a cluster of several: one worker is not in
    multi-worker mode, its logs are not averaged and would stay (1,), which
    TensorBoard refuses."""
    for name in ("train_step", "test_step"):
        step = getattr(model, name)

        def wrapped(data, step=step):
            return {k: tf.reshape(v, [1]) for k, v in step(data).items()}

        setattr(model, name, wrapped)


def is_chief(strategy_name: str) -> bool:
    """Only the chief writes the run's files in multi-worker training; any
    other strategy ignores a TF_CONFIG left in the environment."""
    if strategy_name != "multi_worker":
        return True
    tf_config = read_tf_config()
    task = tf_config["task"]
    if task["type"] == "chief":
        return True
    return task["type"] == "worker" and task["index"] == 0 and "chief" not in tf_config["cluster"]


def worker_folder(out: Path, strategy_name: str) -> Path:
    """Where this process keeps its files: the run folder for the chief, a
    folder of its own inside it for another worker (its resume backup and
    config), so workers given one shared folder never write the same file."""
    if is_chief(strategy_name):
        return out
    task = read_tf_config()["task"]
    return out / f"{task['type']}{task['index']}"
