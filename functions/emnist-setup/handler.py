"""emnist-setup: initialise a run in the parameter store and start one emnist-train per worker.

POST a JSON object of config overrides (empty for the stack's defaults): 200 with the run
document. POST {"resume": RUN_ID}: relaunch the run's unfinished workers, restoring the run
from its checkpoint first if the store lost it. GET ?run_id=ID: the run's progress and results.
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
from emnist.train.run import UnknownRun, new_run_id, resume_run, run_status, setup_run

TRAIN_FUNCTION = "emnist-train"


def _gateway() -> GatewayClient:
    env = environment()
    return GatewayClient(env.get("gateway_url") or env.get("OPENFAAS_URL")
                         or "http://gateway.openfaas:8080")


def _status(event):
    run_id = event.query.get("run_id")
    store_url = event.query.get("store_url") or TrainConfig.from_sources(environment()).store_url
    return respond(200, run_status(kv_for(store_url), run_id))


def _string(request: dict, name: str) -> str | None:
    value = request.pop(name, None)
    if value is not None and not isinstance(value, str):
        raise ConfigError(name, "must be a string")
    return value


def _setup(event):
    request = json_body(event)
    run_id, resume = _string(request, "run_id"), _string(request, "resume")
    gateway = _gateway()

    def start(body: dict) -> None:
        gateway.invoke_async(TRAIN_FUNCTION, body)

    if resume is not None:
        if request.keys() - {"store_url", "checkpoint_url"}:
            raise BadRequest("resume takes only store_url and checkpoint_url besides the run id")
        cfg = TrainConfig.from_sources(environment(), request)
        state = resume_run(kv_for(cfg.store_url), resume, cfg.checkpoint_url, start)
        print(f"Run {resume} resumed: workers {state['resumed_workers']}", flush=True)
        return respond(200, state)
    cfg = TrainConfig.from_sources(environment(), request)
    workers = cfg.number_of_workers or max(1, gateway.replicas(TRAIN_FUNCTION))
    if cfg.execution_type == 1:  # each train function initialises (first one) and trains
        run_id = run_id or new_run_id()
        config = {**cfg.to_dict(), "number_of_workers": workers}
        for w in range(workers):
            start({"run_id": run_id, "worker_id": w, "store_url": cfg.store_url,
                   "config": config})
        return respond(200, {"run_id": run_id, "workers": workers, "config": config,
                             "execution_type": 1})
    state = setup_run(cfg, kv_for(cfg.store_url), workers, run_id=run_id, start_worker=start)
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
