"""emnist-grad: the gradient of one minibatch, for a serverless peer (p2p training).

POST JSON:
  {"params_key": KEY, "store_url": URL}   parameters from the store (codec-encoded float32),
   or {"params": BASE64}                  ... sent encoded in the request (small models)
  {"data": LOCATION, "batch": NAME}       the batch file at a data location (`emnist data split
                                          --batches`: a directory or an http(s) URL prefix),
   or {"batch_data": BASE64}              ... a small codec-encoded (B, inputs + 1) uint8 batch
  {"inputs": 784, "hidden": 100, "classes": 10}  the MLP's shape; optional "run_id", "step".
200: the codec-encoded float32 gradient (application/octet-stream), the batch's mean loss in
the X-Loss header. A bad request is a 400 naming the problem; an unknown params_key is a 404.
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

from emnist.data import DataError
from emnist.faas import BadRequest, environment, error, kv_for, typed_body
from emnist.model import MLP, MLPShape, to_float
from emnist.p2p.split import BatchCache
from emnist.store import StoreError, codec

FIELDS = {"run_id": str, "step": int, "params_key": str, "params": str, "store_url": str,
          "data": str, "batch": str, "batch_data": str, "inputs": int, "hidden": int,
          "classes": int}
BATCH_NAME = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_.-]+)*$")
MAX_INLINE = 1 << 20  # bytes of base64 accepted inline

_batches = BatchCache()
_params: OrderedDict = OrderedDict()  # (store_url, key) -> params, a few recent steps
_params_lock = threading.Lock()
_local = threading.local()


class NotFound(LookupError):
    pass


def _parse(event) -> dict:
    req = typed_body(event, FIELDS, ("inputs", "hidden", "classes"))
    for name in ("inputs", "hidden", "classes"):
        if req[name] < 1:
            raise BadRequest(f"{name}: must be >= 1, got {req[name]}")
    if ("params_key" in req) == ("params" in req):
        raise BadRequest("params_key or params: give exactly one")
    if ("batch" in req) == ("batch_data" in req):
        raise BadRequest("batch or batch_data: give exactly one")
    if "batch" in req:
        if "data" not in req:
            raise BadRequest("data: required with batch (the data location)")
        if not BATCH_NAME.match(req["batch"]) or ".." in req["batch"]:
            raise BadRequest(f"batch: {req['batch']!r} is not a batch file name")
    return req


def _b64(name: str, text: str) -> bytes:
    if len(text) > MAX_INLINE:
        raise BadRequest(f"{name}: {len(text)} bytes inline, at most {MAX_INLINE}: "
                         "use the store (params_key) or the data location (batch)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(f"{name}: not base64 ({e})") from None


def _load_params(req: dict, n: int) -> np.ndarray:
    if "params" in req:
        try:
            return codec.decode("params", _b64("params", req["params"]), dtype=np.float32,
                                shape=(n,)).array
        except codec.CorruptValue as e:
            raise BadRequest(f"params: {e.reason}") from None
    url = req.get("store_url") or environment().get("store_url") or ""
    if not url:
        raise BadRequest("store_url: required with params_key (none in the environment)")
    key = (url, req["params_key"])
    with _params_lock:
        if key in _params:
            return _params[key]
    raw = kv_for(url).get_many([req["params_key"]]).get(req["params_key"])
    if raw is None:
        raise NotFound(f"params_key: {req['params_key']!r} not found in the store")
    try:
        arr = codec.decode(req["params_key"], raw, dtype=np.float32, shape=(n,)).array
    except codec.CorruptValue as e:
        raise BadRequest(f"params_key: {e}") from None
    with _params_lock:
        _params[key] = arr
        while len(_params) > 8:
            _params.popitem(last=False)
    return arr


def _load_batch(req: dict, shape: MLPShape) -> tuple[np.ndarray, np.ndarray]:
    try:
        if "batch_data" in req:
            xy = codec.decode("batch_data", _b64("batch_data", req["batch_data"]),
                              dtype=np.uint8).array
        else:
            xy = _batches.get(req["data"], req["batch"])
    except codec.CorruptValue as e:
        raise BadRequest(f"batch_data: {e.reason}") from None
    except DataError as e:
        raise BadRequest(f"batch: {e}") from None
    if xy.ndim != 2 or xy.shape[1] != shape.inputs + 1 or len(xy) == 0:
        raise BadRequest(f"batch: shape {xy.shape} where (B, {shape.inputs + 1}) was expected")
    x, y = xy[:, :-1], xy[:, -1]
    if int(y.max()) >= shape.classes:
        raise BadRequest(f"batch: label {int(y.max())} >= classes {shape.classes}")
    return x, y


def _model(shape: MLPShape) -> MLP:
    models = getattr(_local, "models", None)
    if models is None:
        models = _local.models = {}
    if shape not in models:
        models[shape] = MLP(shape)  # its gradient buffer is reused: one per thread
    return models[shape]


def handle(event, context):
    try:
        if event.method != "POST":
            return error(405, f"method {event.method} not allowed: use POST")
        req = _parse(event)
        shape = MLPShape(req["inputs"], req["hidden"], req["classes"])
        x, y = _load_batch(req, shape)
        params = _load_params(req, shape.num_params)
        loss, grad = _model(shape).loss_and_grad(params, to_float(x), y)
        body = codec.encode(grad, clock=req.get("step", 0))
    except BadRequest as e:
        return error(400, str(e))
    except NotFound as e:
        return error(404, str(e))
    except StoreError as e:
        print(f"store error: {e}", file=sys.stderr, flush=True)
        return error(502, str(e))
    return {"statusCode": 200, "body": body,
            "headers": {"Content-Type": "application/octet-stream", "X-Loss": repr(loss)}}
