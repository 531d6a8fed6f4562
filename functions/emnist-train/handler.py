"""emnist-train: one Downpour SGD worker of a run (execution type 3: loops until done).

POST {"run_id": ID, "worker_id": N}; the run's config comes from the store, written by
emnist-setup, so every worker of a run trains alike.
"""

import json
import os
import sys

try:
    import emnist  # noqa: F401
except ImportError:  # in the image, configuration.copy places the package beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emnist.faas import BadRequest, environment, error, json_body, kv_for, respond
from emnist.store import StoreError
from emnist.train.config import ConfigError, TrainConfig
from emnist.train.run import UnknownRun, train_worker

FIELDS = {"run_id": str, "worker_id": int, "store_url": str}


def _parse(event) -> dict:
    request = json_body(event)
    for name, value in request.items():
        if name not in FIELDS:
            raise BadRequest(f"{name}: unknown field; known: {', '.join(FIELDS)}")
        if not isinstance(value, FIELDS[name]) or isinstance(value, bool):
            raise BadRequest(f"{name}: must be of type {FIELDS[name].__name__}, got {value!r}")
    for name in ("run_id", "worker_id"):
        if name not in request:
            raise BadRequest(f"{name}: required")
    return request


def handle(event, context):
    try:
        if event.method != "POST":
            return error(405, f"method {event.method} not allowed: use POST")
        request = _parse(event)
        store_url = request.get("store_url") or TrainConfig.from_sources(environment()).store_url
        res, record = train_worker(kv_for(store_url), request["run_id"], request["worker_id"],
                                   context.hostname)
    except (BadRequest, ConfigError, ValueError) as e:
        return error(400, str(e))
    except UnknownRun as e:
        return error(404, str(e))
    except StoreError as e:
        print(f"store error: {e}", file=sys.stderr, flush=True)
        return error(502, str(e))
    print(res.summary_line(), flush=True)
    print(json.dumps({"emnist_result": record}), flush=True)
    return respond(200, record)
