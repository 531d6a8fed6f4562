"""The serverless peer's gradient source: each minibatch's gradient by one emnist-grad call.

Per step the peer writes its parameters to the store once (``emnist:{run}:p2p:params:{rank}:
{step}``, codec-encoded), then invokes ``emnist-grad`` through the gateway for each of the
step's minibatches in parallel (what the original did with a Step Functions Map state over
Lambda). Each call names the parameters' key and the batch file at the data location; the
function returns the codec-encoded gradient, and the peer averages them in batch order.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from emnist.gateway.client import GatewayClient, GatewayError
from emnist.model import MLPShape
from emnist.p2p.split import batch_name
from emnist.store import codec, shared_kv
from emnist.store.keys import key_for


class GradFunctionError(RuntimeError):
    """emnist-grad answered with an error or an unusable gradient."""


def params_key(run_id: str, rank: int, step: int) -> str:
    return key_for(run_id, "p2p", "params", rank, step)


class ServerlessGradients:
    def __init__(self, cfg, shape: MLPShape, parallel: int | None = None) -> None:
        self.cfg, self.shape, self.n = cfg, shape, shape.num_params
        self.kv = shared_kv(cfg.store_url)  # the process's handle: never closed here
        self.pool = ThreadPoolExecutor(max_workers=parallel or max(1, min(cfg.sync_every, 16)),
                                       thread_name_prefix="emnist-grad")
        self._local = threading.local()
        self._prev: str | None = None
        self.calls = 0

    def _client(self) -> GatewayClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = GatewayClient(self.cfg.gateway)
        return client

    def _call(self, key: str, b: int, step: int) -> tuple[np.ndarray, float]:
        cfg = self.cfg
        body = {"run_id": cfg.run_id, "params_key": key, "store_url": cfg.store_url,
                "data": cfg.data, "batch": batch_name(cfg.batch_size, cfg.rank, int(b)),
                "inputs": self.shape.inputs, "hidden": self.shape.hidden,
                "classes": self.shape.classes, "step": step}
        for attempt in (1, 2):  # one retry: a replica may be restarting
            try:
                resp = self._client().invoke(cfg.function, body, timeout=cfg.timeout,
                                             check=False)
            except GatewayError as e:
                if attempt == 2:
                    raise GradFunctionError(f"{cfg.function}: {e}") from None
                continue
            if resp.status_code == 200:
                break
            if attempt == 2 or resp.status_code < 500:
                raise GradFunctionError(f"{cfg.function} for batch {b} of step {step}: "
                                        f"{resp.status_code} {resp.text[:300]}")
        try:
            grad = codec.decode(f"{cfg.function} batch {b}", resp.content, dtype=np.float32,
                                shape=(self.n,)).array
            loss = float(resp.headers.get("X-Loss", "nan"))
        except (codec.CorruptValue, ValueError) as e:
            raise GradFunctionError(str(e)) from None
        return grad, loss

    def compute(self, params: np.ndarray, step: int,
                batches: np.ndarray) -> tuple[np.ndarray, float]:
        key = params_key(self.cfg.run_id, self.cfg.rank, step)
        self.kv.set_many({key: codec.encode(params, clock=step)})
        futures = [self.pool.submit(self._call, key, b, step) for b in batches]
        results = [f.result() for f in futures]
        self.calls += len(results)
        total = np.zeros(self.n, dtype=np.float32)
        for g, _ in results:  # batch order: deterministic
            total += g
        if self._prev:
            self.kv.delete_many([self._prev])
        self._prev = key
        return total * np.float32(1.0 / len(results)), sum(x for _, x in results) / len(results)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._prev:
            self.kv.delete_many([self._prev])
            self._prev = None
