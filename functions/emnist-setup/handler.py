"""emnist-setup: initialise a run in the parameter store and start one emnist-train per worker.

POST a JSON object of config overrides (empty for the stack's defaults): 200 with the run id.
GET ?run_id=ID: the run's progress and results (what `emnist train` polls).
"""

import os
import sys

try:
    import emnist  # noqa: F401
except ImportError:  # in the image, configuration.copy places the package beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emnist.faas import BadRequest, environment, error, json_body, kv_for, respond
from emnist.gateway.client import GatewayClient, GatewayError
from emnist.store import StoreError
from emnist.train.config import ConfigError, TrainConfig
from emnist.train.run import UnknownRun, run_status, setup_run

TRAIN_FUNCTION = "emnist-train"


def _gateway() -> GatewayClient:
    env = environment()
    return GatewayClient(env.get("gateway_url") or env.get("OPENFAAS_URL")
                         or "http://gateway.openfaas:8080")


def _status(event):
    run_id = event.query.get("run_id")
    store_url = event.query.get("store_url") or TrainConfig.from_sources(environment()).store_url
    return respond(200, run_status(kv_for(store_url), run_id))


def _setup(event):
    request = json_body(event)
    run_id = request.pop("run_id", None)
    if run_id is not None and not isinstance(run_id, str):
        raise ConfigError("run_id", "must be a string")
    cfg = TrainConfig.from_sources(environment(), request)
    gateway = _gateway()
    workers = cfg.number_of_workers or max(1, gateway.replicas(TRAIN_FUNCTION))
    state = setup_run(cfg, kv_for(cfg.store_url), workers, run_id=run_id,
                      start_worker=lambda body: gateway.invoke_async(TRAIN_FUNCTION, body))
    print(f"Run {state['run_id']}: {workers} workers on {cfg.dataset}", flush=True)
    return respond(200, state)


def handle(event, context):
    try:
        if event.method == "GET":
            if not event.query.get("run_id"):
                return error(400, "GET needs ?run_id=ID (POST a config to start a run)")
            return _status(event)
        if event.method != "POST":
            return error(405, f"method {event.method} not allowed: use POST or GET")
        return _setup(event)
    except (BadRequest, ConfigError, ValueError) as e:
        return error(400, str(e))
    except UnknownRun as e:
        return error(404, str(e))
    except (StoreError, GatewayError) as e:
        return error(502, str(e))
