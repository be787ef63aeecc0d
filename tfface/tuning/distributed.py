"""KerasTuner's chief/worker mode, as a search runs it.

KerasTuner's own client waits an hour for a chief that is not there, and
its chief polls every 20 s and has no time budget; the parts replaced here
(the role from the environment, a bounded wait for the chief, the oracle
server) keep KerasTuner's servicer and protocol unchanged.
"""

from __future__ import annotations

import logging
import os
import time

from tfface.config import ConfigError
from tfface.tuning.config import TuningError

log = logging.getLogger(__name__)


def distributed_role() -> str:
    """"local", or KerasTuner's "chief" / "worker" from its environment."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "local"
    for var in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
        if not os.environ.get(var):
            raise ConfigError(f"KERASTUNER_ORACLE_IP is set but {var} is not (distributed search needs both)")
    port = os.environ["KERASTUNER_ORACLE_PORT"]
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"KERASTUNER_ORACLE_PORT must be a port number (1-65535), got {port!r}")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def wait_for_chief(minutes: float) -> None:
    """Waits for the chief's oracle to accept connections, for at most
    `minutes`. KerasTuner's own client would wait an hour on its first call
    and then fail with a bare DEADLINE_EXCEEDED traceback."""
    import grpc

    tuner_id = os.environ["KERASTUNER_TUNER_ID"]
    target = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    log.info("worker %s: waiting up to %g min for the chief's oracle at %s", tuner_id, minutes, target)
    channel = grpc.insecure_channel(target)
    try:
        grpc.channel_ready_future(channel).result(timeout=minutes * 60.0)
    except grpc.FutureTimeoutError:
        raise TuningError(
            f"worker {tuner_id}: no chief answered at {target} within {minutes:g} min (chief_wait_minutes); "
            f"start the chief (KERASTUNER_TUNER_ID=chief, same config) or check "
            f"KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT"
        ) from None
    finally:
        channel.close()


def stop_oracle(oracle):
    """No new trials: the oracle answers STOPPED from now on."""
    done = max(1, len(oracle.trials))
    if not oracle.max_trials or oracle.max_trials > done:
        log.warning("time budget spent: no new trials after %d", len(oracle.trials))
        oracle.max_trials = done


def serve_oracle(oracle, deadline=None, poll_seconds=0.5) -> bool:
    """The chief: serves `oracle` to the workers over gRPC until they are done.

    KerasTuner's own servicer and protocol (`oracle_chief`), with a short
    poll (KerasTuner sleeps 20 s between checks), the time budget, and a
    clean server stop. Returns whether the budget stopped the search.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # newer grpc raises instead of returning 0
        bound = 0
    if bound == 0:
        raise ConfigError(f"the chief cannot listen on {address} (port in use?)")
    server.start()
    log.info("chief: oracle served on %s", address)
    stopped_by_budget = False
    try:
        while True:
            time.sleep(poll_seconds)
            if deadline and time.time() > deadline and not stopped_by_budget:
                stop_oracle(oracle)
                stopped_by_budget = True
            if servicer.stop_triggered and oracle_chief.exit_chief(oracle):
                break
    finally:
        server.stop(grace=2).wait()
    return stopped_by_budget
