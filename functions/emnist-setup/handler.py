"""emnist-setup: initialise a run in the parameter store and start one emnist-train per worker.

POST a JSON object of config overrides (empty for the stack's defaults): 200 with the run
document (its ``model`` is the network's ModelSpec, which every worker builds). POST
{"resume": RUN_ID}: relaunch the run's unfinished workers, restoring the run from its
checkpoint first if the store lost it. GET ?run_id=ID: the run's progress and results
(``&detail=1``: every worker's whole state, for the dashboard). GET ?runs=1[&limit=N]: the
newest runs of the store's run index (at most 100), with their state.

The request is untrusted (OpenFaaS does not authenticate callers): the store, data and
checkpoint places come from this function's environment, or from the request only where the
environment's policy allows (emnist.policy: allowed_store_urls, data_roots, checkpoint_roots),
and sizes are capped (max_params, max_workers).
"""

import os
import sys

try:
    import emnist  # noqa: F401
except ImportError:  # in the image, configuration.copy places the package beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from emnist import policy
from emnist.faas import (
    BadRequest,
    Conflict,
    NotFound,
    environment,
    error,
    gateway_url,
    guarded,
    json_body,
    log,
    open_store,
    redacted,
    resolved_config,
    respond,
)
from emnist.gateway.client import GatewayClient
from emnist.store import CorruptValue
from emnist.store.keys import key_for, valid_run_id
from emnist.train.config import TrainConfig
from emnist.train.run import UnknownRun, new_run_id, resume_run, run_status, setup_run
from emnist.train.runindex import LIST_MAX, list_runs

TRAIN_FUNCTION = "emnist-train"
RUN_ID_RULE = "not a valid run id (1-64 letters, digits, '-' or '_')"


def _run_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not valid_run_id(value):
        raise BadRequest(f"{name}: {RUN_ID_RULE}")
    return value


def _query_store(event, env: dict):
    """The store a GET reads: the function's own, or ?store_url= where the policy allows."""
    own = TrainConfig.from_sources(env).store_url
    store_url = event.query.get("store_url")
    if store_url:
        policy.check_store_url(env, "store_url", store_url, own)
    return open_store(store_url or own, env)


def _flag(event, name: str) -> bool:
    return event.query.get(name, "").lower() in ("1", "true", "yes")


def _runs(event, env: dict):
    raw = event.query.get("limit") or "50"
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= LIST_MAX):
        raise BadRequest(f"limit: must be an integer between 1 and {LIST_MAX}")
    return respond(200, {"runs": list_runs(_query_store(event, env), int(raw))})


def _status(event, env: dict):
    run_id = _run_id("run_id", event.query.get("run_id"))
    kv = _query_store(event, env)
    try:
        return respond(200, redacted(run_status(kv, run_id, detail=_flag(event, "detail"),
                                                env=env)))
    except CorruptValue as e:  # a damaged, forged or over-cap run document
        log(f"status {run_id}: {e}")
        raise Conflict(f"run_id: the stored run document of {run_id} is refused: {e.reason} "
                       "(details in the function's logs)") from None
    except UnknownRun:
        raise NotFound(f"run_id: unknown run id {run_id} (not in this function's store)") \
            from None


def _resume(request: dict, run_id: str, env: dict, start):
    if request.keys() - {"store_url", "checkpoint_url"}:
        raise BadRequest("resume: takes only store_url and checkpoint_url besides the run id")
    cfg = resolved_config(TrainConfig.from_request(env, request), env)
    try:
        state = resume_run(open_store(cfg.store_url, env), run_id, cfg.checkpoint_url, start,
                           env=env)
    except UnknownRun as e:
        log(f"resume {run_id}: {e}")
        where = ("nor in checkpoint_url" if cfg.checkpoint_url else
                 "and no checkpoint_url to restore it from")
        raise NotFound(f"resume: unknown run id {run_id}: not in the store {where}") from None
    except CorruptValue as e:
        log(f"resume {run_id}: {e}")
        if e.key == key_for(run_id, "run"):  # stored or restored: forged, or over a cap
            raise Conflict(f"resume: the run document of {run_id} is refused: {e.reason} "
                           "(details in the function's logs)") from None
        raise Conflict(f"checkpoint_url: the checkpoint of run {run_id} is damaged (details "
                       "in the function's logs)") from None
    print(f"Run {run_id} resumed: workers {state['resumed_workers']}", flush=True)
    return respond(200, redacted(state))


def _setup(event, env: dict):
    request = json_body(event)
    run_id, resume = request.pop("run_id", None), request.pop("resume", None)
    if run_id is not None:
        run_id = _run_id("run_id", run_id)
    client = GatewayClient(gateway_url(env))

    def start(body: dict) -> None:
        client.invoke_async(TRAIN_FUNCTION, body)

    if resume is not None:
        return _resume(request, _run_id("resume", resume), env, start)
    cfg = resolved_config(TrainConfig.from_request(env, request), env)
    workers = cfg.number_of_workers or max(1, client.replicas(TRAIN_FUNCTION))
    cfg.check_caps(env, workers)
    if cfg.execution_type == 1:  # each train function initialises (first one) and trains
        run_id = run_id or new_run_id()
        config = {**cfg.to_dict(), "number_of_workers": workers}
        for w in range(workers):
            start({"run_id": run_id, "worker_id": w, "store_url": cfg.store_url,
                   "config": config})
        return respond(200, redacted({"run_id": run_id, "workers": workers, "config": config,
                                      "execution_type": 1}))
    try:
        state = setup_run(cfg, open_store(cfg.store_url, env), workers, run_id=run_id,
                          start_worker=start)
    except CorruptValue as e:  # a document under this run id that does not verify
        log(f"setup {run_id}: {e}")
        raise Conflict(f"run_id: run {run_id} already exists in the store (its document is "
                       "refused: details in the function's logs)") from None
    print(f"Run {state['run_id']}: {workers} workers, {cfg.model} on {cfg.dataset}", flush=True)
    return respond(200, redacted(state))


@guarded(data_field="data_location")
def handle(event, context):
    env = environment()
    if event.method == "GET":
        if _flag(event, "runs"):
            return _runs(event, env)
        if not event.query.get("run_id"):
            return error(400, "run_id: GET needs ?run_id=ID or ?runs=1 (POST a config to "
                         "start a run)")
        return _status(event, env)
    if event.method != "POST":
        return error(405, f"method {event.method} not allowed: use POST or GET")
    return _setup(event, env)
