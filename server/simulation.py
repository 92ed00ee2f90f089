"""Federated training on one machine: Flower's simulation engine (Ray), one virtual
SuperNode per client, the same ClientApp and server as a real deployment."""

from __future__ import annotations

import logging
import os
from typing import Optional

from toolkit.config import Config
from toolkit.data import ImageData
from toolkit.errors import UserError
from toolkit.federated import GlobalModel
from toolkit.runs import RunDir

log = logging.getLogger("toolkit")


def quiet_flower() -> None:
    # Flower's INFO lines and Ray's banner would bury the round log; errors still show, and
    # our own log reports failed and dropped replies each round.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.common.logger import console_handler

    console_handler.setLevel(logging.ERROR)
    logging.getLogger("flwr").propagate = False  # not again through a root handler (scripts)


def simulate(config: Config, data: ImageData, run: RunDir, resume: bool = False, classifier=None,
             client_app=None) -> GlobalModel:
    """Run (or continue) the configured rounds; returns the global model after them.
    `client_app` replaces the project's ClientApp (tests use it to inject faulty clients)."""
    quiet_flower()
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as project_client_app
    from server.app import serve

    f = config.federated
    outcome: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["model"] = serve(grid, config, run, data, resume=resume, classifier=classifier)
        except BaseException as err:  # the server runs in a thread: carry its error out
            outcome["error"] = err
            raise

    cpus = os.cpu_count() or 1
    run_simulation(server_app=server_app, client_app=client_app or project_client_app,
                   num_supernodes=f.clients,
                   backend_config={"client_resources": {"num_cpus": min(f.client_cpus, cpus), "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR", "log_to_driver": False,
                                                 "include_dashboard": False, "num_cpus": cpus}})
    if "error" in outcome:
        raise outcome["error"]
    model: Optional[GlobalModel] = outcome.get("model")
    if model is None:
        raise UserError("the federated simulation ended without finishing its rounds (see the log above)")
    return model
