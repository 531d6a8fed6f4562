"""The simulator's cost model: what every minibatch, transfer, invocation and message costs in
virtual time, and what the hardware costs in money. One YAML or JSON file describes a cluster;
``emnist sim calibrate`` measures this machine and writes one; ``emnist/sim/costs/*.yml`` are
the shipped clusters (``emnist sim costs`` lists them).

Units: seconds, bytes, bytes per second, US dollars. Every number must be finite and inside
the range given below (a file that says otherwise is refused with a message naming the
field, e.g. ``store.bandwidth: must be > 0 and <= 1e+12, got -1``). Unknown fields are refused.

``name``, ``description``: free text. ``calibrated``: what calibrate measured (free form).

``nodes``: a list of node kinds the workers run on (workers are placed round-robin over every
node: worker w on node w mod N, so a node hosts ceil(W / N) workers; they share its cores):

- ``name``; ``count`` nodes of this kind [1, 100000]; ``cores`` per node [1, 1024];
- ``speed``: compute speed relative to the calibrated machine (0, 100] (a straggler kind: 0.5);
- ``memory_gb`` per node (for the price) [0, 1e5]; ``link_bandwidth``: the node's NIC, bytes/s
  each direction, shared by its workers (0, 1e12];
- ``placement`` (optional): ``per-core`` (the default: a runnable job goes to the core with
  the fewest jobs and stays, as Linux places processes; n jobs on one core each get
  ``speed * min(1, cores / busy cores) / n``) or ``shared`` (ideal processor sharing: with
  n busy, each gets ``speed * min(1, cores / n)``).


``compute``: ``spread`` (lognormal sigma of one minibatch's time around its median, [0, 3]);
``drift`` and ``drift_steps``: each worker's speed also wanders slowly, a log-normal factor
with sigma ``drift`` [0, 3] whose correlation decays over ``drift_steps`` minibatches
[1, 1e7] (an AR(1) process in log space): what a shared machine does to processes that
should run alike (measured: 25-minibatch means of one process vary by ~11% here, correlated
over ~100 minibatches), and what keeps Downpour workers from running in lockstep.
``models``: per model name (``mlp``, ``lenet5``, ...; the MLP key may carry its hidden
width, ``mlp-h100``, picked first when it matches) a table measured on one core at speed 1:

- ``params``: the parameter count it was measured with (a model of another size is scaled by
  the ratio of parameter counts);
- ``step``: {batch size: seconds per minibatch (forward, backward and the SGD update)};
  other batch sizes are interpolated linearly (and extrapolated from the nearest two);
- ``eval_per_sample``: seconds per test image of an evaluation (accuracy + loss);
- ``spread`` (optional): this model's own lognormal sigma.

``client``: worker CPU per byte moved: ``decode_per_byte`` (codec check + copy of a received
value), ``encode_per_byte`` (framing a value to send), ``vector_per_byte`` (one elementwise
float32 pass: a delta, a sum, an update), all [0, 1e-3].

``store``: the parameter store (memcached), each server a FIFO queue whose service time per
request is ``op + bytes / bandwidth``; chunks are spread over ``servers`` by the memcached
client's own rendezvous hash:

- ``servers`` [1, 10000]; ``rtt``: network round trip node <-> server [0, 10] s;
  ``op``: server time per request [0, 1] s; ``bandwidth``: bytes/s a server sends (reads),
  ``write_bandwidth``: bytes/s it takes in (writes: a set's or a cas's value), both (0, 1e12];
- ``note_per_push`` (bool): the worker's progress note is one more small set per push
  (memcached; on Redis it rides in the push's transaction);
- ``doc_bytes``: the size of a worker state document [1, 1e7]; ``vcpus``, ``memory_gb`` per
  server (price); ``on_node`` (optional bool, default false): the server runs on the workers'
  machine (one machine: loopback), so a call's whole time (round trip and service: client,
  kernel and server work alike) is also CPU work on the caller's node, shared by processor
  sharing with everything else there; it still queues at the server.

``tier``: the node-local tier (``local_store_url``): ``rtt``, ``op``, ``bandwidth``,
``write_bandwidth`` as for a store server (one per node), and ``sync_interval`` (s between
background syncs, (0, 3600]).

``broker``: the p2p broker (Redis Streams), one server: ``rtt``, ``op``, ``bandwidth``,
``write_bandwidth`` (a publish's message), ``on_node``, ``vcpus``, ``memory_gb``; and
(optional, default 0) ``wake``, ``wake_spread``: a reader blocked in XREAD gets a new entry
this much later than a request/response call would (median seconds, lognormal sigma);
measured here from publish to a blocked reader's return with the real RedisBroker in two
processes (1.8 ms median, 3.0 ms mean for a 333 KB message, against ~0.4 ms modelled);
``io_factor`` (optional, default 1, [1, 1000]): with ``on_node``, a broker call's work on
the caller's cores is this many times its single-call figure (three processes exchanging
gradients at once over loopback cost far more than one alone: measured by calibrate with
three exchange-only processes, ~3-5x on this VM when it is otherwise quiet).

``gateway``: ``invoke`` (s per synchronous call with a small body, the whole HTTP round trip
through the gateway to a warm replica), ``per_byte`` (s per request or response byte through
it), ``async`` (s from an async invoke to the replica starting); ``on_node`` (bool): the
gateway's work runs on the workers' CPU (one machine: the local gateway), else it is a delay;
``io_factor`` (optional, default 1): with ``on_node``, that work costs this many times its
single-call figure (measured by calibrate: three processes of two threads each calling a
gradient-sized function at once, against processor sharing of the single-call cost).

``functions`` (emnist-grad): ``on_node`` (bool: replicas share the workers' CPU, as the local
gateway's do; else each instance has its own core), ``instances`` (warm instances kept, 0:
elastic), ``concurrency`` (at most this many run at once, the rest queue; 0: unlimited),
``cold_start`` (s to start an instance), ``keep_warm`` (s an idle instance survives),
``speed`` (relative CPU), ``memory_gb`` (billed size), ``handler`` (s of fixed handler work
per call beyond the gradient and encoding its answer), ``params_fetch`` (optional, default 0:
s of an instance's work to take a step's parameters beyond the store call and the decode,
paid once per instance and step; calibrate measures both with the real emnist-grad).

``run``: ``setup`` (s of emnist-setup before workers start), ``worker_start`` (s of a worker's
own start: load the run, take the lease, open and check its shard), ``peer_start`` (s of a p2p
peer's start: interpreter, imports, partition load).

``prices`` ($): ``vcpu_hour`` and ``gb_hour`` for VMs (nodes, store servers, the broker),
``function_gb_second`` and ``function_request`` for functions (AWS Lambda: 1.6667e-5 and 2e-7).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["COSTS_DIR", "CostError", "Costs", "ModelCost", "NodeKind", "Server", "load_costs",
           "parse_costs", "shipped", "validate"]

COSTS_DIR = Path(__file__).with_name("costs")


class CostError(ValueError):
    """A cost file that cannot be used; the message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


# -- the schema: (lowest, highest, lowest excluded) per number; bool; str ------------------------
NUM = "num"
INT = "int"
BOOL = "bool"
STR = "str"

BYTES_S = (0, 1e12, True)
SECONDS = (0, 10.0, False)
PER_BYTE = (0, 1e-3, False)

NODE = {"name": (STR,), "count": (INT, 1, 100_000, False), "cores": (NUM, 1, 1024, False),
        "speed": (NUM, 0, 100, True), "memory_gb": (NUM, 0, 1e5, False),
        "link_bandwidth": (NUM, *BYTES_S), "placement": ("choice", ("per-core", "shared"))}
SERVER = {"rtt": (NUM, *SECONDS), "op": (NUM, 0, 1.0, False), "bandwidth": (NUM, *BYTES_S),
          "write_bandwidth": (NUM, *BYTES_S), "on_node": (BOOL,), "vcpus": (NUM, 0, 1024, False),
          "memory_gb": (NUM, 0, 1e5, False)}
SCHEMA: dict[str, Any] = {
    "name": (STR,), "description": (STR,), "calibrated": ("any",),
    "nodes": ("list", NODE),
    "compute": {"spread": (NUM, 0, 3, False), "drift": (NUM, 0, 3, False),
                "drift_steps": (NUM, 1, 1e7, False), "models": ("models",)},
    "client": {"decode_per_byte": (NUM, *PER_BYTE), "encode_per_byte": (NUM, *PER_BYTE),
               "vector_per_byte": (NUM, *PER_BYTE)},
    "store": {**SERVER, "servers": (INT, 1, 10_000, False), "note_per_push": (BOOL,),
              "doc_bytes": (INT, 1, 10_000_000, False)},
    "tier": {"rtt": SERVER["rtt"], "op": SERVER["op"], "bandwidth": SERVER["bandwidth"],
             "write_bandwidth": SERVER["bandwidth"], "sync_interval": (NUM, 0, 3600, True)},
    "broker": {**SERVER, "wake": (NUM, *SECONDS), "wake_spread": (NUM, 0, 3, False),
               "io_factor": (NUM, 1, 1000, False)},
    "gateway": {"invoke": (NUM, *SECONDS), "per_byte": (NUM, *PER_BYTE),
                "async": (NUM, *SECONDS), "on_node": (BOOL,), "io_factor": (NUM, 1, 1000, False)},
    "functions": {"on_node": (BOOL,), "instances": (INT, 0, 1_000_000, False),
                  "concurrency": (INT, 0, 1_000_000, False), "cold_start": (NUM, 0, 600, False),
                  "keep_warm": (NUM, 0, 1e6, False), "speed": (NUM, 0, 100, True),
                  "memory_gb": (NUM, 0, 1e4, True), "handler": (NUM, *SECONDS),
                  "params_fetch": (NUM, *SECONDS)},
    "run": {"setup": (NUM, 0, 3600, False), "worker_start": (NUM, 0, 3600, False),
            "peer_start": (NUM, 0, 3600, False)},
    "prices": {"vcpu_hour": (NUM, 0, 1e4, False), "gb_hour": (NUM, 0, 1e4, False),
               "function_gb_second": (NUM, 0, 1.0, False),
               "function_request": (NUM, 0, 1.0, False)},
}
MODEL = {"params": (INT, 1, 10**10, False), "eval_per_sample": (NUM, 0, 1.0, False),
         "spread": (NUM, 0, 3, False)}
MAX_BATCH = 65_536
MAX_STEP_S = 3600.0


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _check_number(where: str, value: Any, spec: tuple) -> float | int:
    kind, low, high, low_open = spec
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 1.0e10 (no exponent sign) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CostError(where, f"must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise CostError(where, f"must be a finite number, got {_show(value)}")
    if kind == INT and (not float(value).is_integer()):
        raise CostError(where, f"must be an integer, got {_show(value)}")
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        rng = f"> {low:g} and <= {high:g}" if low_open else f"between {low:g} and {high:g}"
        raise CostError(where, f"must be {rng}, got {_show(value)}")
    return int(value) if kind == INT else float(value)


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:40] + "..."


def _check(where: str, value: Any, spec: Any) -> Any:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise CostError(where, f"must be a mapping, got {_show(value)}")
        unknown = sorted(set(map(str, value)) - set(spec))
        if unknown:
            raise CostError(f"{where}.{unknown[0]}" if where else unknown[0],
                            f"unknown field; known: {', '.join(sorted(spec))}")
        missing = sorted(k for k, s in spec.items() if k not in value and _required(s)
                         and k not in OPTIONAL)
        if missing:
            raise CostError(f"{where}.{missing[0]}" if where else missing[0], "missing")
        out = {k: _check(f"{where}.{k}" if where else k, v, spec[k]) for k, v in value.items()}
        out.update({k: d for k, d in OPTIONAL.items() if k in spec and k not in out})
        return out
    kind = spec[0]
    if kind == STR:
        if not isinstance(value, str) or len(value) > 4096:
            raise CostError(where, "must be a string of at most 4096 characters")
        return value
    if kind == BOOL:
        if not isinstance(value, bool):
            raise CostError(where, f"must be true or false, got {_show(value)}")
        return value
    if kind == "any":
        return value
    if kind == "choice":
        if value not in spec[1]:
            raise CostError(where, f"must be one of {', '.join(spec[1])}, got {_show(value)}")
        return value
    if kind == "list":
        if not isinstance(value, list) or not value or len(value) > 100:
            raise CostError(where, "must be a list of 1 to 100 node kinds")
        return [_check(f"{where}[{i}]", v, spec[1]) for i, v in enumerate(value)]
    if kind == "models":
        return _check_models(where, value)
    return _check_number(where, value, spec)


# fields that may be left out, with their defaults
OPTIONAL = {"on_node": False, "wake": 0.0, "wake_spread": 0.0, "io_factor": 1.0,
            "params_fetch": 0.0, "placement": "per-core"}


def _required(spec: Any) -> bool:
    """Every section and number is required, except free text, calibration notes and the
    OPTIONAL flags."""
    return isinstance(spec, dict) or spec[0] not in (STR, "any")


def _check_models(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise CostError(where, "must map model names to their measured costs")
    out = {}
    for name, m in value.items():
        at = f"{where}.{name}"
        if not isinstance(m, dict):
            raise CostError(at, "must be a mapping (params, step, eval_per_sample)")
        unknown = sorted(set(map(str, m)) - {*MODEL, "step"})
        if unknown:
            raise CostError(f"{at}.{unknown[0]}", "unknown field; known: eval_per_sample, "
                            "params, spread, step")
        for k in ("params", "step", "eval_per_sample"):
            if k not in m:
                raise CostError(f"{at}.{k}", "missing")
        checked: dict[str, Any] = {k: _check_number(f"{at}.{k}", m[k], MODEL[k])
                                   for k in MODEL if k in m}
        step = m["step"]
        if not isinstance(step, dict) or not step or len(step) > 64:
            raise CostError(f"{at}.step", "must map 1 to 64 batch sizes to seconds per "
                            "minibatch")
        table = {}
        for b, s in step.items():
            try:
                batch = int(b)
            except (TypeError, ValueError):
                raise CostError(f"{at}.step", f"batch size {_show(b)} is not an integer") \
                    from None
            if not 1 <= batch <= MAX_BATCH:
                raise CostError(f"{at}.step", f"batch size {batch} outside 1..{MAX_BATCH}")
            table[batch] = _check_number(f"{at}.step.{batch}", s, (NUM, 0, MAX_STEP_S, True))
        checked["step"] = dict(sorted(table.items()))
        out[str(name)] = checked
    return out


def validate(doc: Any) -> dict[str, Any]:
    """The checked document (numbers as float/int), or CostError naming the first bad field."""
    if not isinstance(doc, dict):
        raise CostError("costs", "must be a mapping at the top level")
    doc = dict(doc)
    nodes = doc.get("nodes")
    if isinstance(nodes, list):
        doc["nodes"] = [{"name": f"node{i}", **n} if isinstance(n, dict) else n
                        for i, n in enumerate(nodes)]
    return _check("", doc, SCHEMA)


# -- the typed view the simulator uses --------------------------------------------------------

@dataclass(frozen=True)
class NodeKind:
    name: str
    count: int
    cores: float
    speed: float
    memory_gb: float
    link_bandwidth: float
    placement: str = "per-core"  # per-core run queues as Linux; "shared": ideal sharing


@dataclass(frozen=True)
class Server:
    rtt: float
    op: float
    bandwidth: float
    write_bandwidth: float
    vcpus: float = 0.0
    memory_gb: float = 0.0
    on_node: bool = False  # it runs on the workers' machine: its calls burn their cores

    def service(self, req: int, resp: int) -> float:
        """Seconds one request occupies the server: its op, the request's bytes coming in
        and the response's going out."""
        return self.op + req / self.write_bandwidth + resp / self.bandwidth


@dataclass(frozen=True)
class ModelCost:
    params: int
    step: dict[int, float]
    eval_per_sample: float
    spread: float

    def step_s(self, batch: int, params: int | None = None) -> float:
        """Median seconds per minibatch of ``batch`` (one core, speed 1), interpolated."""
        pts = sorted(self.step.items())
        if len(pts) == 1:
            b0, s0 = pts[0]
            t = s0 * batch / b0
        else:
            lo = max((p for p in pts if p[0] <= batch), default=pts[0], key=lambda p: p[0])
            hi = min((p for p in pts if p[0] >= batch), default=pts[-1], key=lambda p: p[0])
            if lo[0] == hi[0]:  # exact, or outside the table: the two nearest
                near = sorted(pts, key=lambda p: abs(p[0] - batch))[:2]
                lo, hi = sorted(near)
            t = lo[1] + (hi[1] - lo[1]) * (batch - lo[0]) / (hi[0] - lo[0])
            t = max(t, 0.1 * min(s for _, s in pts) * batch / pts[0][0])
        return t * (params / self.params if params else 1.0)


@dataclass
class Costs:
    doc: dict[str, Any]
    source: str = ""
    nodes: list[NodeKind] = field(init=False)
    store: Server = field(init=False)
    tier: Server = field(init=False)
    broker: Server = field(init=False)

    def __post_init__(self) -> None:
        d = self.doc
        self.nodes = [NodeKind(**n) for n in d["nodes"]]
        s = d["store"]
        self.store = Server(s["rtt"], s["op"], s["bandwidth"], s["write_bandwidth"], s["vcpus"],
                            s["memory_gb"], s["on_node"])
        t = d["tier"]
        self.tier = Server(t["rtt"], t["op"], t["bandwidth"], t["write_bandwidth"])
        b = d["broker"]
        self.broker = Server(b["rtt"], b["op"], b["bandwidth"], b["write_bandwidth"],
                             b["vcpus"], b["memory_gb"], b["on_node"])

    def __getitem__(self, section: str) -> Any:
        return self.doc[section]

    @property
    def name(self) -> str:
        return str(self.doc.get("name") or Path(self.source).stem)

    def node_list(self) -> list[NodeKind]:
        """Every node, kinds expanded in order (worker w runs on node w mod len)."""
        return [k for k in self.nodes for _ in range(k.count)]

    def model(self, name: str, hidden: int | None = None) -> ModelCost:
        models = self.doc["compute"]["models"]
        key = f"{name}-h{hidden}" if hidden else name
        m = models.get(key) or models.get(name) or next(
            (v for k, v in models.items() if k.split("-h")[0] == name), None)
        if m is None:
            raise CostError(f"compute.models.{name}", f"no compute cost for model {name!r} in "
                            f"{self.source or self.name}; known: {', '.join(models)} "
                            "(emnist sim calibrate --model measures it)")
        return ModelCost(m["params"], m["step"], m["eval_per_sample"],
                         m.get("spread", self.doc["compute"]["spread"]))

    def to_dict(self) -> dict[str, Any]:
        return self.doc


def parse_costs(text: str, source: str = "") -> Costs:
    """A cost file's text (YAML, a superset of JSON) checked and typed."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CostError(source or "costs", f"not YAML or JSON: {str(e).splitlines()[0]}") \
            from None
    return Costs(validate(doc), source)


def shipped() -> dict[str, Path]:
    """The shipped cost files by name (``emnist sim ... --costs NAME``)."""
    return {p.stem: p for p in sorted(COSTS_DIR.glob("*.yml"))}


def load_costs(name_or_path: str) -> Costs:
    """A shipped cost file by name (``local``, ``study3``, ...) or a path to one."""
    p = Path(name_or_path)
    if not p.exists():
        known = shipped()
        if name_or_path in known:
            p = known[name_or_path]
        else:
            raise CostError("costs", f"no cost file {name_or_path!r} (shipped: "
                            f"{', '.join(known)}; or give a path)")
    if p.stat().st_size > 1 << 20:
        raise CostError(str(p), "cost file larger than 1 MiB")
    return parse_costs(p.read_text(), str(p))
