"""Federated training on one machine: one virtual SuperNode per client, the same ClientApp
and server as a real deployment. `--simulation ray` (default) runs them on Flower's
simulation engine, clients in parallel Ray actors; `--simulation inline` calls them in this
process one after another (server/inline_grid.py), for many small clients."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

from flwr.app import Context
from flwr.common.logger import console_handler
from flwr.serverapp import Grid, ServerApp

from gankit.clients.app import app as project_client_app
from gankit.config import Config
from gankit.data import ImageData
from gankit.errors import UserError
from gankit.federated import GlobalModel
from gankit.runs import RunDir
from gankit.server.app import RoundsStopped, serve
from gankit.server.inline_grid import InlineGrid
from gankit.server.watchdog import start_for_this_process

log = logging.getLogger("gankit")


def quiet_flower() -> None:
    # Flower's INFO lines and Ray's banner would bury the round log; errors still show, and
    # our own log reports failed and dropped replies each round.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    console_handler.setLevel(logging.ERROR)
    logging.getLogger("flwr").propagate = False  # not again through a root handler (scripts)


class Interrupted(Exception):
    """The simulation stopped at a round's end on Ctrl-C; its checkpoint is saved."""


def catch_sigint(stop: threading.Event):
    """First Ctrl-C: finish the current round, save and stop (as standard training does).
    Second: end the process at once; Ray's workers go with it (a plain KeyboardInterrupt
    would leave the server thread waiting for replies that never come)."""
    def handler(signum, frame):
        if stop.is_set():
            log.warning("second Ctrl-C: aborting")
            try:
                import ray
                ray.shutdown()
            finally:
                os._exit(130)
        stop.set()
        log.warning("Ctrl-C: stopping after this round and saving its checkpoint (press again "
                    "to abort)")
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        return None


def simulate(config: Config, data: ImageData, run: RunDir, resume: bool = False, classifier=None,
             client_app=None) -> GlobalModel:
    """Run (or continue) the configured rounds; returns the global model after them.
    `client_app` replaces the project's ClientApp (tests use it to inject faulty clients)."""
    quiet_flower()
    f = config.federated
    stop = threading.Event()
    if f.simulation == "inline":
        return simulate_inline(config, data, run, resume, classifier, client_app or project_client_app,
                               stop)
    from flwr.simulation import run_simulation  # late: slow to import; --simulation inline never uses it

    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["model"] = serve(grid, config, run, data, resume=resume, classifier=classifier,
                                     stop=stop)
        except BaseException as err:  # the server runs in a thread: carry its error out
            outcome["error"] = err
            raise

    cpus = os.cpu_count() or 1
    previous = catch_sigint(stop)
    watchdog = start_for_this_process()  # ends Ray's agents should this process be killed
    try:
        run_simulation(server_app=server_app, client_app=client_app or project_client_app,
                       num_supernodes=f.clients,
                       backend_config={"client_resources": {"num_cpus": min(f.client_cpus, cpus), "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR", "log_to_driver": False,
                                                     "include_dashboard": False, "num_cpus": cpus}})
    except RoundsStopped:
        pass  # outcome["error"] says which round
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        if watchdog is not None:
            watchdog.terminate()
    if isinstance(outcome.get("error"), RoundsStopped):
        interrupted(run, outcome["error"])
    if "error" in outcome:
        raise outcome["error"]
    model: Optional[GlobalModel] = outcome.get("model")
    if model is None:
        raise UserError("the federated simulation ended without finishing its rounds (see the log above)")
    return model


def interrupted(run: RunDir, stopped: Exception):
    log.info("interrupted after round %s; checkpoint saved. Continue with: gankit train "
             "--resume %s", stopped.args[0], run.path)
    raise Interrupted(run.path) from None


def simulate_inline(config: Config, data: ImageData, run: RunDir, resume: bool, classifier,
                    client_app, stop: threading.Event) -> GlobalModel:
    grid = InlineGrid(client_app, config.federated.clients)
    previous = catch_sigint(stop)
    try:
        return serve(grid, config, run, data, resume=resume, classifier=classifier, stop=stop)
    except RoundsStopped as stopped:
        interrupted(run, stopped)  # raises Interrupted
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
