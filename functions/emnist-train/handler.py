"""emnist-train: one worker of a run.

POST {"run_id": ID, "worker_id": N}: the run's config and network (its ModelSpec) come from
the store (written by emnist-setup), so every worker of a run trains the same model alike.
Execution type 3 loops until done in this invocation (or, with ``slice_seconds``, for that
long: then it asks the gateway for the next invocation, so no call outlives the platform's
timeouts); type 2 trains one pass and asks the gateway for the next invocation; type 1 also
carries "config" and the first worker to arrive initialises the run. A worker whose state
exists resumes where it stopped. A continuation names its ``pass`` and ``step``; calls are
delivered at least once (OpenFaaS's queue redelivers), so one that finds the worker past
them, or done, trains and writes nothing and answers the worker's record with ``"repeat":
true`` (no second result line in the logs).

The request is untrusted: its ``store_url`` and the places in a type-1 ``config`` must be this
function's own or allowed by its environment's policy (emnist.policy), like emnist-setup's.
So is the store: the run document must verify (its seal, when ``store_key_secret`` names a
key) and every place and size it names must pass the same policy and caps (409 otherwise).
"""

import json
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
    answer_for,
    environment,
    error,
    gateway_url,
    guarded,
    log,
    open_store,
    resolved_config,
    respond,
    typed_body,
)
from emnist.gateway.client import GatewayClient
from emnist.models import preload
from emnist.store import CorruptValue
from emnist.store.keys import valid_run_id
from emnist.train.config import LIMITS, ConfigError, TrainConfig
from emnist.train.run import UnknownRun, ensure_run, record_failure, train_worker
from emnist.train.state import LeaseLost, WorkerBusy

FIELDS = {"run_id": str, "worker_id": int, "store_url": str, "config": dict, "pass": int,
          "step": int}
MAX_PASS = int(LIMITS["iterations"][1])  # a pass is one of the run's iterations
MAX_STEP = 2**53  # a worker's minibatch count (exact in every JSON reader)

preload(os.environ.get("model", ""))  # a torch stack imports torch before the replica is ready


def _next_pass(body: dict, env: dict):
    """The next invocation names its pass and step: a redelivered copy finds the worker
    past them (a no-op)."""
    url = gateway_url(env)
    return lambda n, step: GatewayClient(url).invoke_async(
        "emnist-train", {**body, "pass": n, "step": step})


def _train(event, context, env: dict):
    request = typed_body(event, FIELDS, ("run_id", "worker_id"))
    run_id, worker_id = request["run_id"], request["worker_id"]
    if not valid_run_id(run_id):
        raise BadRequest("run_id: not a valid run id (1-64 letters, digits, '-' or '_')")
    top = policy.max_workers(env)
    if not 0 <= worker_id < top:
        raise BadRequest(f"worker_id: must be between 0 and {top - 1} (max_workers)")
    if not 1 <= request.get("pass", 1) <= MAX_PASS:
        raise BadRequest(f"pass: must be between 1 and {MAX_PASS}")
    if not 0 <= request.get("step", 0) <= MAX_STEP:
        raise BadRequest(f"step: must be between 0 and {MAX_STEP}")
    own = TrainConfig.from_sources(env).store_url
    store_url = request.get("store_url") or own
    if "store_url" in request:
        policy.check_store_url(env, "store_url", store_url, own)
    cfg = None
    if "config" in request:  # the whole request is validated before anything is done
        cfg = resolved_config(TrainConfig.from_request(env, request["config"]), env)
        if cfg.execution_type != 1 or not cfg.number_of_workers:
            raise BadRequest("config: only for execution_type 1, with number_of_workers")
    kv = open_store(store_url, env)
    try:
        return _run(request, cfg, context, env, kv)
    except Exception as e:  # noted for the watcher, then answered by guarded as always
        _note_failure(kv, run_id, worker_id, context.hostname, e)
        raise


def _note_failure(kv, run_id: str, worker_id: int, hostname: str, e: Exception) -> None:
    """A failure a watcher should hear of: in the run's store, for a run that exists, in the
    words of the answer; 5xx (store, gateway, internal) may pass on a retry. A busy worker
    (another delivery trains it) and an unknown run are not failures of this worker."""
    if isinstance(e, Busy | NotFound | BadRequest | ConfigError):
        return  # not the run's failure: a busy worker, an unknown run, a bad worker id
    answer = answer_for(e, "run_id")
    try:
        record_failure(kv, run_id, worker_id, hostname, answer["body"]["error"],
                       retry=answer["statusCode"] >= 500)
    except Exception as note_error:  # noqa: BLE001 - the store may be what failed
        log(f"worker {worker_id}: could not note the failure: {note_error}")


class Busy(Conflict):
    """Another invocation owns the worker (a duplicate delivery): answered 409, not noted."""


def _run(request: dict, cfg: TrainConfig | None, context, env: dict, kv):
    run_id, worker_id = request["run_id"], request["worker_id"]
    body = {k: v for k, v in request.items() if k != "config"}
    try:
        if cfg is not None:
            ensure_run(cfg, kv, cfg.number_of_workers, run_id)
        st, record = train_worker(kv, run_id, worker_id, context.hostname,
                                  next_pass=_next_pass(body, env), env=env,
                                  for_pass=request.get("pass"),
                                  for_step=request.get("step"))
    except CorruptValue as e:  # a run or worker document that is damaged, forged or refused
        log(f"worker {worker_id}: {e}")
        raise Conflict(f"run_id: a stored document of run {run_id} is refused: {e.reason} "
                       "(details in the function's logs)") from None
    except UnknownRun:
        raise NotFound(f"run_id: unknown run id {run_id} (not in this function's store)") \
            from None
    except (WorkerBusy, LeaseLost) as e:
        log(f"worker {worker_id}: {e}")
        raise Busy(f"worker_id: {e}") from None
    if record.get("repeat"):  # a redelivered or duplicated call: the first one answered
        log(f"worker {worker_id}: nothing to do for this call (pass "
            f"{request.get('pass', '-')}, worker at pass {st.iteration}, done {st.done})")
    elif st.done:
        print(st.summary_line(), flush=True)
        print(json.dumps({"emnist_result": record}), flush=True)
    return respond(200, record)


@guarded(data_field="run_id")
def handle(event, context):
    if event.method != "POST":
        return error(405, f"method {event.method} not allowed: use POST")
    return _train(event, context, environment())
