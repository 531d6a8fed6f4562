"""Fuzz the trust boundary over HTTP: at least 1000 generated malformed requests to every
function and every /system endpoint of a real local gateway. Every answer must be a 4xx (a
clean refusal), never a 5xx, a dropped connection or a hang; no answer may carry a traceback
or a server path; and afterwards every replica still serves."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emnist.train.config import FIELD_KINDS, LIMITS
from tests.conftest import MEMCACHED_URL
from tests.gateway_tools import GatewayProcess
from tests.servers import ROOT

EXAMPLES = 1000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FUNCTIONS = ("emnist-setup", "emnist-train", "emnist-grad")
LEAKS = ("Traceback", 'File "/', str(ROOT), "/usr/lib/python", "site-packages")


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {"STORE_URL": MEMCACHED_URL, "EMNIST_HOME": str(tmp / "home"),
           "DATA_ROOTS": str(tmp / "data"), "CHECKPOINT_ROOTS": str(tmp / "ckpt")}
    proc = GatewayProcess(tmp, "--replicas", "emnist-train=1", "--replicas", "emnist-grad=1",
                          env=env, stack=ROOT / "emnist.yml")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False
    yield s
    s.close()


# -- what a malformed request looks like ------------------------------------------------------

junk_text = st.text(max_size=80)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), junk_text)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(junk_text, inner, max_size=4)), max_leaves=12)
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "", "application/x-www-form"
                                 "-urlencoded", "multipart/form-data; boundary=x",
                                 "application/json; charset=utf-16"])


def wrong_type(kind: type) -> st.SearchStrategy[Any]:
    """A JSON value that is surely not of ``kind`` (bool counts as neither int nor float)."""
    others = {
        int: st.one_of(junk_text, st.lists(st.integers(), max_size=2), st.booleans(),
                       st.floats(allow_nan=False).filter(lambda f: f != int(f)
                                                         if abs(f) < 1e300 else True)),
        float: st.one_of(junk_text, st.lists(st.floats(), max_size=2), st.booleans(),
                         st.dictionaries(junk_text, st.integers(), max_size=2)),
        str: st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                       st.lists(junk_text, max_size=2)),
        bool: st.one_of(st.integers(), junk_text, st.lists(st.booleans(), max_size=2)),
        dict: st.one_of(st.integers(), junk_text, st.lists(st.integers(), max_size=2)),
    }
    return others[kind]


def out_of_range(name: str) -> st.SearchStrategy[Any]:
    low, high, _ = LIMITS[name]
    return st.one_of(st.floats(min_value=high * 1.5 + 1, max_value=1e308),
                     st.integers(min_value=int(high) + 1, max_value=2**80),
                     st.floats(max_value=low - 1, min_value=-1e308),
                     st.integers(max_value=int(low) - 1, min_value=-(2**80)))


@st.composite
def bad_object(draw, fields: dict[str, type], ranged: dict[str, str] | None = None) -> dict:
    """An object with at least one field that cannot be valid: unknown, of the wrong type, or
    out of its documented range; other fields may be anything."""
    obj = draw(st.dictionaries(st.sampled_from(sorted(fields)), json_values, max_size=3))
    how = draw(st.sampled_from(["unknown", "type", "range"] if ranged else ["unknown", "type"]))
    if how == "unknown":  # (run_id and resume are emnist-setup's own: never "unknown")
        obj[draw(st.text(min_size=1, max_size=20).filter(
            lambda k: k not in fields and k not in ("run_id", "resume")))] = draw(json_values)
    elif how == "type":
        name = draw(st.sampled_from(sorted(fields)))
        obj[name] = draw(wrong_type(fields[name]))
    else:
        name = draw(st.sampled_from(sorted(ranged)))
        obj[name] = draw(out_of_range(name))
    return obj


def raw_body(objects: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    """Bodies: a bad object as JSON, with non-finite literals spliced in, or not JSON at all."""
    nonfinite = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
    return st.one_of(
        objects.map(lambda o: json.dumps(o).encode()),
        st.tuples(objects, nonfinite).map(
            lambda t: json.dumps({**t[0], "alpha": "@@"}).replace('"@@"', t[1]).encode()),
        st.binary(min_size=1, max_size=200).filter(bytes.strip),  # (empty means {}: valid)
        json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: json.dumps(v).encode()),
        st.sampled_from([b"{", b'{"a":', b"\xff\xfe{}", b'{"a": 1}{"b": 2}', b"[" * 5000,
                         b'{"x": "' + b"\\ud800" + b'"}']),
    )


SETUP_FIELDS = {name: kind for name, (kind, _) in FIELD_KINDS.items()}
SETUP_RANGED = {name: name for name in LIMITS}
TRAIN_FIELDS = {"run_id": str, "worker_id": int, "store_url": str, "config": dict}
GRAD_FIELDS = {"run_id": str, "step": int, "params_key": str, "params": str, "store_url": str,
               "data": str, "batch": str, "batch_data": str, "inputs": int, "hidden": int,
               "classes": int}
BODIES = {"emnist-setup": raw_body(bad_object(SETUP_FIELDS, SETUP_RANGED)),
          "emnist-train": raw_body(bad_object(TRAIN_FIELDS)),
          "emnist-grad": raw_body(bad_object(GRAD_FIELDS))}
METHODS = st.sampled_from(["POST", "POST", "POST", "PUT", "PATCH", "DELETE", "GET"])


def assert_refused(resp: requests.Response, what: Any) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300], what)
    for leak in LEAKS:
        assert leak not in resp.text, (leak, resp.text[:300], what)


def assert_still_serving(gw: GatewayProcess, http: requests.Session) -> None:
    assert http.get(f"{gw.url}/healthz", timeout=10).status_code == 200
    for fn in FUNCTIONS:
        status = http.get(f"{gw.url}/system/function/{fn}", timeout=10).json()
        assert status["availableReplicas"] >= 1, status
        r = http.request("PUT", f"{gw.url}/function/{fn}", timeout=30)
        assert r.status_code == 405, (fn, r.status_code, r.text)  # a known answer, served


# -- the functions ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_functions_refuse_malformed_requests(gw, http, fn):
    seen = []

    @FUZZ
    @given(method=METHODS, body=BODIES[fn], ctype=CONTENT_TYPES,
           query=st.dictionaries(st.sampled_from(["run_id", "store_url", "x"]),
                                 junk_text, max_size=2))
    def check(method, body, ctype, query):
        if fn == "emnist-setup" and method == "GET" and "run_id" not in query:
            query = {**query, "run_id": "../" + query.get("x", "")}  # never a plain listing
        headers = {"Content-Type": ctype} if ctype else {}
        r = http.request(method, f"{gw.url}/function/{fn}", data=body, params=query,
                         headers=headers, timeout=60)
        assert_refused(r, (method, body[:200], query))
        seen.append(r.status_code)

    check()
    assert len(seen) >= EXAMPLES
    assert_still_serving(gw, http)


# -- the /system API ---------------------------------------------------------------------------

NAMES = st.one_of(st.text(max_size=40), st.sampled_from(["emnist-setup", "emnist-train"]))
FORBIDDEN_ENV = st.sampled_from(["PATH", "PYTHONPATH", "PYTHONWARNINGS", "BROWSER",
                                 "LD_PRELOAD", "HOME", "EMNIST_SECRETS_DIR", "OPENFAAS_URL",
                                 "HTTP_PROXY", "https_proxy", "fprocess", "NOT_IN_THE_LIST"])


@st.composite
def bad_deploy(draw) -> dict:
    """A deploy request (faas-cli's shape) with at least one thing no deploy may do."""
    base: dict[str, Any] = {"service": draw(st.sampled_from(FUNCTIONS)),
                            "image": "docker.io/emnist/emnist-train:latest",
                            "envVars": {"alpha": "0.2"}}
    extra = draw(st.dictionaries(st.sampled_from(
        ["namespace", "labels", "annotations", "limits", "requests", "secrets", "constraints",
         "envProcess", "readOnlyRootFilesystem"]), json_values, max_size=2))
    base.update(extra)
    how = draw(st.sampled_from(["env", "envProcess", "service", "image", "types", "secret"]))
    if how == "env":
        base["envVars"] = {**base["envVars"], draw(FORBIDDEN_ENV): draw(junk_text)}
    elif how == "envProcess":
        base["envProcess"] = draw(st.text(min_size=1, max_size=40).filter(
            lambda t: t.strip() and t.strip() != "python index.py"))
    elif how == "service":  # a name the stack does not have, and an image it does not serve
        base["service"] = draw(st.one_of(st.text(max_size=80).filter(
            lambda t: t not in FUNCTIONS), st.integers(), st.none()))
        base["image"] = "fuzz/not-in-the-stack:1"
    elif how == "image":
        base["image"] = draw(st.one_of(st.integers(), st.none(), st.just(""),
                                       st.lists(junk_text, max_size=2)))
    elif how == "types":
        key = draw(st.sampled_from(["envVars", "labels", "secrets", "limits"]))
        base[key] = draw(st.one_of(st.integers(), junk_text.filter(bool), st.booleans()))
    else:
        base["secrets"] = [draw(st.text(min_size=1, max_size=30)) + "-no-such-secret"]
    return base


def json_bodies(objects: st.SearchStrategy[dict]) -> st.SearchStrategy[bytes]:
    return st.one_of(objects.map(lambda o: json.dumps(o).encode()), st.binary(max_size=120),
                     json_values.filter(lambda v: not isinstance(v, dict)).map(
                         lambda v: json.dumps(v).encode()),
                     st.sampled_from([b"{", b'{"service": NaN}', b"[" * 5000]))


@st.composite
def bad_scale(draw) -> dict:
    body = {"serviceName": draw(NAMES), "namespace": draw(st.sampled_from(
        [None, "openfaas-fn", "kube-system", ""]))}
    body["replicas"] = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=65),
                                      junk_text, st.floats(), st.booleans(), st.none()))
    return body


@st.composite
def bad_secret(draw) -> dict:
    body = draw(st.dictionaries(st.sampled_from(["name", "value", "rawValue", "namespace"]),
                                json_values, max_size=3))
    how = draw(st.sampled_from(["name", "raw", "namespace", "value"]))
    if how == "name":  # not a DNS-1123 name, or no name
        body["name"] = draw(st.one_of(st.text(max_size=300).filter(
            lambda t: not t or t != t.lower() or "/" in t or ".." in t or len(t) > 253
            or not t[:1].isalnum()), st.integers(), st.none()))
    elif how == "raw":
        body["name"] = "fuzz-ok"
        body["rawValue"] = draw(st.text(min_size=1, max_size=40).filter(
            lambda t: any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                          "0123456789+/=" for c in t)))
    elif how == "namespace":
        body["name"] = "fuzz-ok"
        body["namespace"] = draw(st.text(min_size=1, max_size=20).filter(
            lambda t: t != "openfaas-fn"))
    else:
        body["name"] = "fuzz-ok"
        body.pop("rawValue", None)
        body["value"] = draw(st.one_of(st.integers(), st.lists(junk_text, max_size=2),
                                       st.booleans()))
    return body


SYSTEM = {
    "deploy": (st.sampled_from(["POST", "PUT"]), st.just("/system/functions"),
               json_bodies(bad_deploy())),
    "delete": (st.just("DELETE"), st.just("/system/functions"), json_bodies(
        st.fixed_dictionaries({"functionName": st.one_of(st.text(max_size=40).filter(
            lambda t: t not in FUNCTIONS), st.integers(), st.none()),
            "namespace": st.sampled_from(["openfaas-fn", "x", ""])}))),
    "function": (st.just("GET"), NAMES.filter(lambda n: n not in FUNCTIONS).map(
        lambda n: "/system/function/" + requests.utils.quote(n, safe="")), st.just(b"")),
    "scale": (st.just("POST"), NAMES.map(
        lambda n: "/system/scale-function/" + requests.utils.quote(n or "x", safe="")),
        json_bodies(bad_scale())),
    "secrets": (st.sampled_from(["POST", "PUT", "DELETE"]), st.just("/system/secrets"),
                json_bodies(bad_secret())),
}
LOG_PARAMS = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.text(max_size=30).filter(lambda t: t not in FUNCTIONS), st.just("")),
    "namespace": st.sampled_from(["openfaas-fn", "other", ""]), "tail": junk_text,
    "since": junk_text, "instance": junk_text, "follow": st.sampled_from(["true", "x", ""])})


@pytest.mark.parametrize("endpoint", [*SYSTEM, "logs", "info-and-namespaces"])
def test_system_endpoints_refuse_malformed_requests(gw, http, endpoint):
    seen = []

    @FUZZ
    @given(data=st.data(), ctype=CONTENT_TYPES)
    def check(data, ctype):
        headers = {"Content-Type": ctype} if ctype else {}
        if endpoint == "logs":  # bad names (404) or bad numbers (400): never a stream
            params = data.draw(LOG_PARAMS)
            if params.get("name") in (None, ""):
                params["name"] = ""
            r = http.get(f"{gw.url}/system/logs", params=params, headers=headers, timeout=30)
            what: Any = params
        elif endpoint == "info-and-namespaces":  # any query, any method but GET: 4xx
            path = data.draw(st.sampled_from(["/system/info", "/system/namespaces",
                                              "/system/functions", "/system/secrets"]))
            method = data.draw(st.sampled_from(["PATCH", "OPTIONS", "TRACE", "PROPFIND"]))
            r = http.request(method, gw.url + path, headers=headers, timeout=30,
                             data=data.draw(st.binary(max_size=50)))
            what = (method, path)
        else:
            methods, paths, bodies = SYSTEM[endpoint]
            method, path, body = data.draw(methods), data.draw(paths), data.draw(bodies)
            r = http.request(method, gw.url + path, data=body, headers=headers, timeout=60)
            what = (method, path, body[:200])
        assert_refused(r, what)
        seen.append(r.status_code)

    check()
    assert len(seen) >= EXAMPLES
    assert_still_serving(gw, http)
    # nothing the fuzz sent was deployed, scaled or stored
    listed = {f["name"]: f for f in http.get(f"{gw.url}/system/functions", timeout=10).json()}
    assert set(listed) == set(FUNCTIONS)
    assert listed["emnist-train"]["replicas"] == 1 and listed["emnist-grad"]["replicas"] == 1
    assert http.get(f"{gw.url}/system/secrets", timeout=10).json() == []
