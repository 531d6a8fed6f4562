"""emnist-grad: the gradient of one minibatch, for a serverless peer (p2p training).

POST JSON:
  {"params_key": KEY, "store_url": URL}   parameters from the store: chunked like a run's
                                          parameter store (``KEY:layout``, ``KEY:w:{i}``, read in
                                          bounded batches), or one codec-encoded float32 value
   or {"params": BASE64}                  ... sent encoded in the request (small models)
  {"data": LOCATION, "batch": NAME}       the batch file at a data location (`emnist data split
                                          --batches`: a directory or an http(s) URL prefix),
   or {"batch_data": BASE64}              ... a small codec-encoded (B, inputs + 1) uint8 batch
  {"model": SPEC}                         the network: emnist.models.ModelSpec's fields
                                          ({"name": "lenet5", "channels": 1, "height": 28, ...}),
   or {"inputs": 784, "hidden": 100, "classes": 10}  the MLP's shape (the original fields);
  optional "run_id", "step", "dropout_seed" (1-8 integers: the minibatch's dropout masks).
200: the codec-encoded float32 gradient (application/octet-stream), the batch's mean loss in
the X-Loss header. A bad request is a 400 naming the problem; an unknown params_key or batch
file is a 404.

``params_key`` may name only a p2p peer's parameters of one step
(``emnist:{run}:p2p:params:{rank}:{step}``, what emnist.p2p.serverless writes; under
``run_id`` and for ``step`` when those are given): a training run's keys are never read, so a
caller cannot have the function compute losses on another run's parameters.

The request is untrusted: ``store_url`` and ``data`` default to this function's environment
(``store_url``, ``data_location``) and any other value must be allowed by its policy
(``allowed_store_urls``, ``data_roots``: emnist.policy); the model is validated
(``ModelSpec.from_dict``) and its parameter count, computed without allocating anything,
capped by ``max_params`` before anything is built. Models are cached per request thread (at
most two, and one when big); parameters per (store, key), one fetch per key at a time.
"""

import base64
import binascii
import functools
import os
import re
import sys
import threading
from collections import OrderedDict

try:
    import emnist  # noqa: F401
except ImportError:  # in the image, configuration.copy places the package beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

from emnist import policy
from emnist.data import DataError
from emnist.faas import (
    BadRequest,
    NotFound,
    environment,
    error,
    guarded,
    integer,
    log,
    open_store,
    typed_body,
)
from emnist.model import MLP, MLPShape, to_float
from emnist.p2p.serverless import params_key
from emnist.p2p.split import BatchCache
from emnist.store import CorruptValue, MissingState, ParameterStore, codec

FIELDS = {"run_id": str, "step": int, "params_key": str, "params": str, "store_url": str,
          "data": str, "batch": str, "batch_data": str, "inputs": int, "hidden": int,
          "classes": int, "model": dict, "dropout_seed": list}
SHAPE = ("inputs", "hidden", "classes")
BATCH_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_.-]{1,64}){0,4}$")
PARAMS_KEY = re.compile(r"^[A-Za-z0-9_:.-]{1,200}$")
P2P_KEY = re.compile(r"^emnist:([A-Za-z0-9_-]{1,64}):p2p:params:(\d{1,9}):(\d{1,16})$")
MAX_INLINE = 1 << 20  # bytes of base64 accepted inline
LIMITS = {"inputs": (1, 1 << 20), "hidden": (1, 1_000_000), "classes": (1, 100_000),
          "step": (0, 1 << 53)}
PARAMS_CACHE_BYTES = 256 << 20  # recent steps' parameters, all threads together
MODELS_PER_THREAD = 2  # each holds a gradient buffer of the model's size
MODEL_CACHE_PARAMS = 64_000_000  # a thread keeps one model only when they exceed this
CHUNK_ELEMS = (1024, 1 << 24)  # a stored layout's chunk size, in values
MAX_SEED = (1 << 63) - 1

_batches = BatchCache()
_params: OrderedDict = OrderedDict()  # (store_url, key) -> params, a few recent steps
_params_lock = threading.Lock()
_loading: dict = {}  # (store_url, key) -> the lock of the one thread fetching it
_local = threading.local()


def _parse(event) -> dict:
    req = typed_body(event, FIELDS)
    if "model" in req:
        given = [f for f in SHAPE if f in req]
        if given:
            raise BadRequest(f"{given[0]}: give the model or the MLP's inputs, hidden and "
                             "classes, not both")
    else:
        for name in SHAPE:
            if name not in req:
                raise BadRequest(f"{name}: required (or give model)")
    if "dropout_seed" in req:
        seed = req["dropout_seed"]
        if not 1 <= len(seed) <= 8 or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED
                for v in seed):
            raise BadRequest(f"dropout_seed: must be 1 to 8 integers in [0, {MAX_SEED}]")
    for name, (low, high) in LIMITS.items():
        if name in req:
            integer(req, name, low, high)
    if ("params_key" in req) == ("params" in req):
        raise BadRequest("params_key or params: give exactly one")
    if ("batch" in req) == ("batch_data" in req):
        raise BadRequest("batch or batch_data: give exactly one")
    if "params_key" in req and not PARAMS_KEY.match(req["params_key"]):
        raise BadRequest("params_key: not a store key (letters, digits, ':', '.', '-', '_')")
    if "batch" in req and (not BATCH_NAME.match(req["batch"]) or ".." in req["batch"]):
        raise BadRequest("batch: not a batch file name (like batches-50/peer-0/00003)")
    return req


def _shape(req: dict, env: dict) -> MLPShape:
    inputs, hidden, classes = req["inputs"], req["hidden"], req["classes"]
    n = (inputs + 1) * hidden + (hidden + 1) * classes  # before anything is allocated
    cap = policy.max_params(env)
    if n > cap:
        raise BadRequest(f"hidden: the model would have {n} parameters, more than max_params "
                         f"({cap}) in the function's environment")
    return MLPShape(inputs, hidden, classes)


@functools.lru_cache(maxsize=128)
def _count(spec) -> int:
    from emnist.models import param_count

    return param_count(spec)  # torch models: counted on the meta device, nothing allocated


def _spec(req: dict, env: dict):
    """The validated ModelSpec, within max_params; nothing built yet."""
    from emnist.models import ModelSpec, TorchMissing

    try:
        spec = ModelSpec.from_dict(req["model"])
    except (TypeError, ValueError) as e:
        raise BadRequest(f"model: {str(e)[:300]}") from None
    try:
        n = _count(spec)
    except TorchMissing:
        raise BadRequest(f"model: {spec.name} needs torch, which this function's image does "
                         "not have (the `torch` extra)") from None
    except ValueError as e:  # e.g. an image too small for the architecture
        raise BadRequest(f"model: {str(e)[:300]}") from None
    cap = policy.max_params(env)
    if n > cap:
        raise BadRequest(f"model: {spec.name} would have {n} parameters, more than max_params "
                         f"({cap}) in the function's environment")
    return spec, n


def _b64(name: str, text: str) -> bytes:
    if len(text) > MAX_INLINE:
        raise BadRequest(f"{name}: {len(text)} bytes inline, at most {MAX_INLINE}: "
                         "use the store (params_key) or the data location (batch)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name}: not valid base64") from None


def _reason(e: codec.CorruptValue) -> str:
    """The codec's reason without echoing bytes (a foreign value's magic is shown as such)."""
    return "not a codec value (no EMNS header)" if "magic" in e.reason else e.reason


def _store_url(req: dict, env: dict) -> str:
    own = env.get("store_url") or ""
    if "store_url" not in req:
        if not own:
            raise BadRequest("store_url: required with params_key (none in the environment)")
        return own
    return policy.check_store_url(env, "store_url", req["store_url"], own)


def _check_key(req: dict) -> None:
    """``params_key`` must be a p2p peer's step parameters (emnist.p2p.serverless.params_key),
    of ``run_id`` and ``step`` when given: checked before the store is asked anything, so a
    refused key reveals nothing about what is stored there."""
    key = req["params_key"]
    m = P2P_KEY.match(key)
    if m is None or params_key(m.group(1), int(m.group(2)), int(m.group(3))) != key:
        raise BadRequest("params_key: only a p2p peer's step parameters "
                         "(emnist:<run>:p2p:params:<rank>:<step>) are served, never a "
                         "training run's keys")
    if "run_id" in req and req["run_id"] != m.group(1):
        raise BadRequest("params_key: not a key of run_id's p2p session")
    if "step" in req and req["step"] != int(m.group(3)):
        raise BadRequest("params_key: not the parameters of this step")


def _load_params(req: dict, n: int, env: dict) -> np.ndarray:
    if "params" in req:
        try:
            return codec.decode("params", _b64("params", req["params"]), dtype=np.float32,
                                shape=(n,)).array
        except codec.CorruptValue as e:
            raise BadRequest(f"params: {_reason(e)}") from None
    _check_key(req)
    url = policy.resolve(env, _store_url(req, env))
    key = (url, req["params_key"])
    with _params_lock:
        if key in _params:
            return _params[key]
        lock = _loading.setdefault(key, threading.Lock())
    with lock:  # one thread fetches a key; the others wait for it and share the array
        with _params_lock:
            if key in _params:
                return _params[key]
        try:
            arr = _fetch(open_store(url, env), req["params_key"], n)
        finally:
            with _params_lock:
                _loading.pop(key, None)
        with _params_lock:
            _params[key] = arr
            while len(_params) > 1 and sum(a.nbytes for a in _params.values()) > \
                    PARAMS_CACHE_BYTES:
                _params.popitem(last=False)
    return arr


def _fetch(kv, name: str, n: int) -> np.ndarray:
    """``n`` float32 parameters at ``name``: chunked (``name:layout``) or one value."""
    layout_key = f"{name}:layout"
    got = kv.get_many([name, layout_key])
    if layout_key in got:
        try:
            layout = codec.decode_doc(layout_key, got[layout_key])
            elems, total = layout["chunk_elems"], layout["num_params"]
        except (CorruptValue, KeyError, TypeError) as e:
            log(f"params_key {name}: {e}")
            raise BadRequest("params_key: the stored layout is not a parameter layout") \
                from None
        if total != n:
            raise BadRequest(f"params_key: the stored vector has {total} parameters, the "
                             f"model {n}")
        if not isinstance(elems, int) or not CHUNK_ELEMS[0] <= elems <= CHUNK_ELEMS[1]:
            raise BadRequest("params_key: the stored layout's chunk size is out of range")
        store = ParameterStore.at_key(kv, name, chunk_bytes=4 * elems, num_params=n)
        arr = np.empty(n, dtype=np.float32)
        try:
            store.fetch(arr)  # bounded batches of chunks, straight into the array
        except MissingState as e:
            log(f"params_key {name}: {e}")
            raise NotFound("params_key: some of its chunks are not in the store") from None
        except CorruptValue as e:
            log(f"params_key {name}: {e}")
            raise BadRequest(f"params_key: the stored chunks are not {n} float32 parameters") \
                from None
        return arr
    raw = got.get(name)
    if raw is None:
        raise NotFound("params_key: not found in the store")
    try:
        return codec.decode(name, raw, dtype=np.float32, shape=(n,)).array
    except CorruptValue as e:
        log(f"params_key {name}: {e}")
        raise BadRequest(f"params_key: the stored value is not {n} float32 parameters") from None


def _data(req: dict, env: dict) -> str:
    own = env.get("data_location") or ""
    if not req.get("data"):
        if not own:
            raise BadRequest("data: required with batch (none in the environment)")
        return own
    return policy.check_data_location(env, "data", req["data"], own, urls=True,
                                      own_env="data_location")


def _load_batch(req: dict, shape, env: dict) -> tuple[np.ndarray, np.ndarray]:
    if "batch_data" in req:
        try:
            xy = codec.decode("batch_data", _b64("batch_data", req["batch_data"]),
                              dtype=np.uint8).array
        except codec.CorruptValue as e:
            raise BadRequest(f"batch_data: {_reason(e)}") from None
    else:
        location = _data(req, env)
        try:
            xy = _batches.get(location, req["batch"])
        except DataError as e:  # the caller learns neither the path nor any content
            log(f"batch {req['batch']}: {e}")
            if e.missing:
                raise NotFound("batch: missing: no such batch file at the data location") \
                    from None
            raise BadRequest("batch: not a valid batch file (details in the function's logs)") \
                from None
    if xy.ndim != 2 or xy.shape[1] != shape.inputs + 1 or len(xy) == 0:
        raise BadRequest(f"batch: shape {list(xy.shape)} where [B, {shape.inputs + 1}] was "
                         "expected")
    x, y = xy[:, :-1], xy[:, -1]
    if int(y.max()) >= shape.classes:
        raise BadRequest(f"batch: label {int(y.max())} >= classes {shape.classes}")
    return x, y


def _model(key, n: int, build):
    """This thread's model for ``key`` (an MLPShape or a ModelSpec), built once: at most
    MODELS_PER_THREAD, and only one when it is big (each holds a gradient buffer)."""
    models = getattr(_local, "models", None)
    if models is None:
        models = _local.models = OrderedDict()
    if key in models:
        models.move_to_end(key)
        return models[key][0]
    if n > MODEL_CACHE_PARAMS:
        models.clear()  # drop the others before allocating a big one
    models[key] = (build(), n)
    while len(models) > MODELS_PER_THREAD or (
            len(models) > 1 and sum(m[1] for m in models.values()) > MODEL_CACHE_PARAMS):
        models.popitem(last=False)
    return models[key][0]


def _gradient(req: dict, env: dict) -> tuple[float, np.ndarray]:
    if "model" not in req:  # the original fields: the numpy MLP, exactly as before
        shape = _shape(req, env)
        x, y = _load_batch(req, shape, env)
        params = _load_params(req, shape.num_params, env)
        return _model(shape, shape.num_params, lambda: MLP(shape)).loss_and_grad(
            params, to_float(x), y)
    from emnist.models import build_model

    spec, n = _spec(req, env)
    x, y = _load_batch(req, spec, env)
    params = _load_params(req, n, env)
    model = _model(spec, n, lambda: build_model(spec))
    if "dropout_seed" in req or not spec.name == "mlp":
        model.rng = np.random.default_rng(req.get("dropout_seed", [0]))
    return model.loss_and_grad(params, x, y)


@guarded(data_field="data")
def handle(event, context):
    if event.method != "POST":
        return error(405, f"method {event.method} not allowed: use POST")
    env = environment()
    req = _parse(event)
    loss, grad = _gradient(req, env)
    body = codec.encode(grad, clock=req.get("step", 0))
    # bytes as a tuple: the template's index.py would send str(bytes) from a dict's "body"
    return body, 200, {"Content-Type": "application/octet-stream", "X-Loss": repr(loss)}
