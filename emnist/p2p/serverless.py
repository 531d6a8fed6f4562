"""The serverless peer's gradient source: each minibatch's gradient by one emnist-grad call.

Per step the peer writes its parameters to the store once, chunked like the run's parameter
store (``ParameterStore`` under ``emnist:{run}:p2p:params:{rank}:{step}``: chunks of 384 KiB,
``...:w:{i}``, and the layout ``...:layout`` written last, in bounded batches; so a VGG11's
515 MB fits memcached's 1 MB values), then invokes ``emnist-grad`` through the gateway for
each of the step's minibatches in parallel (what the original did with a Step Functions Map
state over Lambda). Each call names the parameters' key, the batch file at the data location,
the model (``ModelSpec.to_dict()``) and the minibatch's dropout seed; the function returns the
codec-encoded gradient, and the peer averages them in batch order, as it would its own.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from emnist.gateway.client import GatewayClient, GatewayError
from emnist.models import ModelSpec
from emnist.p2p.split import batch_name
from emnist.store import ParameterStore, codec, shared_kv
from emnist.store.keys import key_for


class GradFunctionError(RuntimeError):
    """emnist-grad answered with an error or an unusable gradient."""


def params_key(run_id: str, rank: int, step: int) -> str:
    """The base key of a peer's parameters for one step (``{base}:layout``, ``{base}:w:{i}``)."""
    return key_for(run_id, "p2p", "params", rank, step)


def params_store(kv: Any, run_id: str, rank: int, step: int) -> ParameterStore:
    return ParameterStore(kv, run_id, prefix=("p2p", "params", rank, step))


class ServerlessGradients:
    def __init__(self, cfg: Any, spec: ModelSpec, num_params: int,
                 parallel: int | None = None) -> None:
        from emnist.p2p.peer import dropout_key, has_dropout

        self.cfg, self.spec, self.n = cfg, spec, num_params
        self.model = spec.to_dict()
        self.dropout_key = dropout_key if has_dropout(spec) else None
        self.kv = shared_kv(cfg.store_url)  # the process's handle: never closed here
        self.pool = ThreadPoolExecutor(max_workers=parallel or max(1, min(cfg.sync_every, 16)),
                                       thread_name_prefix="emnist-grad")
        self._local = threading.local()
        self._current: ParameterStore | None = None
        self.total = np.zeros(num_params, dtype=np.float32)
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
                "model": self.model, "step": step}
        if self.dropout_key is not None:
            body["dropout_seed"] = self.dropout_key(cfg.seed, cfg.rank, step, int(b))
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
        """The mean gradient (a buffer reused by the next call) and the mean loss."""
        store = params_store(self.kv, self.cfg.run_id, self.cfg.rank, step)
        store.init(params, {"step": step})
        self._current = store
        futures = [self.pool.submit(self._call, store.base, b, step) for b in batches]
        total = self.total
        total[:] = 0.0
        losses = []
        for f in futures:  # batch order: deterministic, each gradient dropped once added
            g, loss = f.result()
            total += g
            losses.append(loss)
            del g
        self.calls += len(losses)
        store.delete(["layout"])  # every call of the step is answered: no longer needed
        total *= np.float32(1.0 / len(losses))
        return total, sum(losses) / len(losses)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._current is not None:  # a step that failed half-way: its parameters
            self._current.delete(["layout"])
            self._current = None
