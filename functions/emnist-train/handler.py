"""emnist-train: one worker of a run.

POST {"run_id": ID, "worker_id": N}: the run's config comes from the store (written by
emnist-setup), so every worker of a run trains alike. Execution type 3 loops until done in
this invocation; type 2 trains one pass and asks the gateway for the next invocation; type 1
also carries "config" and the first worker to arrive initialises the run. A worker whose state
exists resumes where it stopped.
"""

import json
import os
import sys

try:
    import emnist  # noqa: F401
except ImportError:  # in the image, configuration.copy places the package beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emnist.faas import BadRequest, environment, error, kv_for, respond, typed_body
from emnist.gateway.client import GatewayClient
from emnist.store import MissingState, StoreError
from emnist.train.config import ConfigError, TrainConfig
from emnist.train.run import UnknownRun, ensure_run, train_worker
from emnist.train.state import LeaseLost, WorkerBusy

FIELDS = {"run_id": str, "worker_id": int, "store_url": str, "config": dict}


def _next_pass(body: dict):
    env = environment()
    url = env.get("gateway_url") or env.get("OPENFAAS_URL") or "http://gateway.openfaas:8080"
    return lambda: GatewayClient(url).invoke_async("emnist-train", body)


def handle(event, context):
    try:
        if event.method != "POST":
            return error(405, f"method {event.method} not allowed: use POST")
        request = typed_body(event, FIELDS, ("run_id", "worker_id"))
        store_url = request.get("store_url") or TrainConfig.from_sources(environment()).store_url
        kv = kv_for(store_url)
        if "config" in request:
            cfg = TrainConfig.from_sources(environment(), request["config"])
            if cfg.execution_type != 1 or not cfg.number_of_workers:
                raise BadRequest("config: only for execution_type 1, with number_of_workers")
            ensure_run(cfg, kv, cfg.number_of_workers, request["run_id"])
        body = {k: v for k, v in request.items() if k != "config"}
        st, record = train_worker(kv, request["run_id"], request["worker_id"],
                                  context.hostname, next_pass=_next_pass(body))
    except (BadRequest, ConfigError, ValueError) as e:
        return error(400, str(e))
    except UnknownRun as e:
        return error(404, str(e))
    except (WorkerBusy, LeaseLost) as e:
        print(f"worker {request['worker_id']}: {e}", file=sys.stderr, flush=True)
        return error(409, str(e))
    except (MissingState, StoreError) as e:
        print(f"store error: {e}", file=sys.stderr, flush=True)
        return error(502, str(e))
    if st.done:
        print(st.summary_line(), flush=True)
        print(json.dumps({"emnist_result": record}), flush=True)
    return respond(200, record)
