"""emnist-grad: the gradient of one minibatch, for a serverless peer (p2p training).

POST JSON:
  {"params_key": KEY, "store_url": URL}   parameters from the store (codec-encoded float32),
   or {"params": BASE64}                  ... sent encoded in the request (small models)
  {"data": LOCATION, "batch": NAME}       the batch file at a data location (`emnist data split
                                          --batches`: a directory or an http(s) URL prefix),
   or {"batch_data": BASE64}              ... a small codec-encoded (B, inputs + 1) uint8 batch
  {"inputs": 784, "hidden": 100, "classes": 10}  the MLP's shape; optional "run_id", "step".
200: the codec-encoded float32 gradient (application/octet-stream), the batch's mean loss in
the X-Loss header. A bad request is a 400 naming the problem; an unknown params_key or batch
file is a 404.

The request is untrusted: ``store_url`` and ``data`` default to this function's environment
(``store_url``, ``data_location``) and any other value must be allowed by its policy
(``allowed_store_urls``, ``data_roots``: emnist.policy); the model is capped by ``max_params``.
"""

import base64
import binascii
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
from emnist.p2p.split import BatchCache
from emnist.store import codec

FIELDS = {"run_id": str, "step": int, "params_key": str, "params": str, "store_url": str,
          "data": str, "batch": str, "batch_data": str, "inputs": int, "hidden": int,
          "classes": int}
BATCH_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_.-]{1,64}){0,4}$")
PARAMS_KEY = re.compile(r"^[A-Za-z0-9_:.-]{1,200}$")
MAX_INLINE = 1 << 20  # bytes of base64 accepted inline
LIMITS = {"inputs": (1, 1 << 20), "hidden": (1, 1_000_000), "classes": (1, 100_000),
          "step": (0, 1 << 53)}
PARAMS_CACHE_BYTES = 256 << 20  # recent steps' parameters, all threads together
MODELS_PER_THREAD = 2  # each holds a gradient buffer of the model's size

_batches = BatchCache()
_params: OrderedDict = OrderedDict()  # (store_url, key) -> params, a few recent steps
_params_lock = threading.Lock()
_local = threading.local()


def _parse(event) -> dict:
    req = typed_body(event, FIELDS, ("inputs", "hidden", "classes"))
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


def _load_params(req: dict, n: int, env: dict) -> np.ndarray:
    if "params" in req:
        try:
            return codec.decode("params", _b64("params", req["params"]), dtype=np.float32,
                                shape=(n,)).array
        except codec.CorruptValue as e:
            raise BadRequest(f"params: {_reason(e)}") from None
    url = policy.resolve(env, _store_url(req, env))
    key = (url, req["params_key"])
    with _params_lock:
        if key in _params:
            return _params[key]
    raw = open_store(url, env).get_many([req["params_key"]]).get(req["params_key"])
    if raw is None:
        raise NotFound("params_key: not found in the store")
    try:
        arr = codec.decode(req["params_key"], raw, dtype=np.float32, shape=(n,)).array
    except codec.CorruptValue as e:
        log(f"params_key {req['params_key']}: {e}")
        raise BadRequest(f"params_key: the stored value is not {n} float32 parameters") from None
    with _params_lock:
        _params[key] = arr
        while len(_params) > 1 and sum(a.nbytes for a in _params.values()) > PARAMS_CACHE_BYTES:
            _params.popitem(last=False)
    return arr


def _data(req: dict, env: dict) -> str:
    own = env.get("data_location") or ""
    if not req.get("data"):
        if not own:
            raise BadRequest("data: required with batch (none in the environment)")
        return own
    return policy.check_data_location(env, "data", req["data"], own, urls=True,
                                      own_env="data_location")


def _load_batch(req: dict, shape: MLPShape, env: dict) -> tuple[np.ndarray, np.ndarray]:
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


def _model(shape: MLPShape) -> MLP:
    models = getattr(_local, "models", None)
    if models is None:
        models = _local.models = OrderedDict()
    if shape in models:
        models.move_to_end(shape)
    else:
        models[shape] = MLP(shape)  # its gradient buffer is reused: one per thread
        while len(models) > MODELS_PER_THREAD:
            models.popitem(last=False)
    return models[shape]


@guarded(data_field="data")
def handle(event, context):
    if event.method != "POST":
        return error(405, f"method {event.method} not allowed: use POST")
    env = environment()
    req = _parse(event)
    shape = _shape(req, env)
    x, y = _load_batch(req, shape, env)
    params = _load_params(req, shape.num_params, env)
    loss, grad = _model(shape).loss_and_grad(params, to_float(x), y)
    body = codec.encode(grad, clock=req.get("step", 0))
    # bytes as a tuple: the template's index.py would send str(bytes) from a dict's "body"
    return body, 200, {"Content-Type": "application/octet-stream", "X-Loss": repr(loss)}
