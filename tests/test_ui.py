"""The dashboard without a browser: the run index on a real memcached, the views of each kind
of run, the /ui routes and guards on a real local gateway (with and without a password), the
runs list through emnist-setup's GET, and `emnist dashboard`'s relay to that gateway."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from emnist.cli import main
from emnist.p2p.metrics import MetricsWriter
from emnist.store import ParameterStore, codec, open_kv
from emnist.train import runindex
from emnist.train.run import PROGRESS_FIELDS, run_status
from emnist.ui import views
from emnist.ui.server import Dashboard, make_server, relay_target, serve
from emnist.ui.sources import Sources
from tests.servers import free_port, local_gateway, start_memcached


@pytest.fixture(scope="module")
def memcached():
    """A memcached of this module's own: the run index is one store-wide key."""
    port = free_port()
    proc = start_memcached(port)
    yield f"memcached://127.0.0.1:{port}"
    proc.kill()
    proc.wait(10)


@pytest.fixture
def kv(memcached):
    kv = open_kv(memcached)
    kv.delete_many([runindex.RUNS])
    yield kv
    kv.close()


def _state(run_id: str, workers: int = 2, started: float = 1000.0, **cfg) -> dict:
    return {"run_id": run_id, "workers": workers, "started": started, "num_classes": 10,
            "config": {"algorithm": "downpour", "dataset": "fashion-mnist", "hidden_size": 100,
                       "pixels_per_image": 784, "execution_type": 3, **cfg}}


# -- the run index -----------------------------------------------------------------------------

def test_index_keeps_the_newest_entries_and_lists_their_state(kv):
    for i in range(runindex.INDEX_MAX + 5):
        runindex.record_run(kv, _state(f"r{i}", started=1000.0 + i))
    entries = runindex.read_index(kv)
    assert [e["run_id"] for e in entries] == [f"r{i}" for i in range(5, runindex.INDEX_MAX + 5)]
    assert len(kv.get_many([runindex.RUNS])[runindex.RUNS]) < 64 << 10  # bounded document
    last = f"r{runindex.INDEX_MAX + 4}"
    store = ParameterStore(kv, last)
    store.put_doc("run", _state(last))
    store.put_doc("result:0", {"accuracy": 0.81, "finished": 2000.0, "reached": False})
    listed = runindex.list_runs(kv, limit=3)
    assert [r["run_id"] for r in listed] == [last, f"r{runindex.INDEX_MAX + 3}",
                                             f"r{runindex.INDEX_MAX + 2}"]
    assert listed[0]["state"] == "running" and listed[0]["finished_workers"] == 1
    assert listed[0]["accuracy"] == 0.81 and listed[0]["model"] == "mlp 784-100-10"
    assert listed[1]["state"] == "lost"  # in the index, not in the store
    store.put_doc("result:1", {"accuracy": 0.86, "finished": 2010.0, "reached": True})
    done = runindex.list_runs(kv, limit=1)[0]
    assert done["state"] == "done" and done["reached"] and done["elapsed"] == 2010.0 - (
        1000.0 + runindex.INDEX_MAX + 4)


def test_index_updates_concurrently_lose_nothing(kv):
    def add(t: int) -> None:
        for i in range(15):
            runindex.record_run(kv, _state(f"c{t}-{i}"))

    threads = [threading.Thread(target=add, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(e["run_id"] for e in runindex.read_index(kv)) == sorted(
        f"c{t}-{i}" for t in range(6) for i in range(15))


def test_a_damaged_index_is_started_afresh_and_bad_entries_dropped(kv):
    kv.set_many({runindex.RUNS: b"not a codec value"})
    assert runindex.read_index(kv) == []
    runindex.record_run(kv, _state("fresh"))
    assert [e["run_id"] for e in runindex.read_index(kv)] == ["fresh"]
    kv.set_many({runindex.RUNS: codec.encode_doc({"runs": [
        {"run_id": "<img src=x onerror=alert(1)>", "workers": 1}, {"run_id": "ok", "workers": 1},
        "junk"]})})
    assert [e["run_id"] for e in runindex.read_index(kv)] == ["ok"]


def test_limit_and_key_budget_bound_a_listing(kv, monkeypatch):
    for i in range(5):
        runindex.record_run(kv, _state(f"b{i}", workers=400))
    monkeypatch.setattr(runindex, "KEY_BUDGET", 900)
    listed = runindex.list_runs(kv, limit=runindex.LIST_MAX + 50)
    assert len(listed) == 5
    assert [r["state"] for r in listed] == ["lost", "lost", "unknown", "unknown", "unknown"]


def test_detailed_status_bounds_the_lists_and_hides_the_lease(kv):
    store = ParameterStore(kv, "detail-run")
    store.put_doc("run", {**_state("detail-run", workers=1), "steps_per_pass": 7})
    store.put_doc("worker:0", {"worker_id": 0, "lease": "secret-owner", "curve": [[1, 1, 0.5]]
                               * 1500, "resumes": [{"at": 1}] * 300, "clock": 3})
    st = run_status(kv, "detail-run", detail=True)
    p = st["progress"][0]
    assert "lease" not in p and len(p["curve"]) == 1000 and len(p["resumes"]) == 100
    assert st["steps_per_pass"] == 7
    brief = run_status(kv, "detail-run")["progress"][0]
    assert set(brief) == set(PROGRESS_FIELDS)


def test_the_metrics_ring_is_bounded_and_sampled_at_most_once_a_second():
    from emnist.train.state import SERIES_EVERY, SERIES_MAX, WorkerState

    st = WorkerState(0)
    for i in range(3 * SERIES_MAX):
        st.samples, st.step = 10 * i, i
        st.sample(1000.0 + i * SERIES_EVERY / 2, train_seconds=i / 10)
    assert len(st.series) == SERIES_MAX  # every other call was too soon after the last
    assert st.series[-1][:4] == [1000.0 + (3 * SERIES_MAX - 2) * SERIES_EVERY / 2,
                                 3 * SERIES_MAX - 2, 10 * (3 * SERIES_MAX - 2),
                                 round((3 * SERIES_MAX - 2) / 10, 3)]
    assert "series" not in st.result() and "series" in st.to_dict()


def test_a_checkpoint_restore_is_an_event_and_indexes_the_run_again(kv, memcached, tmp_path):
    from emnist.store.keys import key_for
    from emnist.train.config import TrainConfig
    from emnist.train.run import load_run, resume_run, setup_run, write_checkpoint

    cfg = TrainConfig(dataset="synthetic", number_of_workers=1, iterations=1,
                      store_url=memcached, data_location=str(tmp_path / "shards"),
                      checkpoint_url=str(tmp_path / "ckpt"))
    setup_run(cfg, kv, 1, run_id="restore-run")
    write_checkpoint(*load_run(kv, "restore-run"), cfg.checkpoint_url)
    kv.delete_many([key_for("restore-run", "run"), runindex.RUNS])  # as a restart would
    assert resume_run(kv, "restore-run", cfg.checkpoint_url)["restored_from_checkpoint"]
    st = run_status(kv, "restore-run", detail=True)
    assert len(st["restores"]) == 1
    kinds = [e["kind"] for e in views.store_run_view(st)["events"]]
    assert kinds == ["checkpoint restore"]
    assert [e["run_id"] for e in runindex.read_index(kv)] == ["restore-run"]


# -- views -------------------------------------------------------------------------------------

def _status(**over) -> dict:
    base = {"run_id": "v1", "workers": 2, "started": 100.0, "now": 130.0, "steps_per_pass": 10,
            "num_classes": 10, "done": False, "stop": None,
            "config": {"algorithm": "averaging", "batch_size": 50, "lease_seconds": 5.0,
                       "average_every": 5, "target_accuracy": 0.85, "dataset": "fashion-mnist",
                       "hidden_size": 100, "pixels_per_image": 784,
                       "store_url": "memcached://x:1"},
            "progress": [
                {"worker_id": 0, "hostname": "pod-a", "iteration": 2, "offset": 5, "samples": 1250,
                 "train_seconds": 5.0, "seconds": 20.0, "heartbeat": 129.0, "clock": 40,
                 "bytes_fetched": 1000, "bytes_pushed": 500, "push_retries": 3,
                 "curve": [[10.0, 1, 0.7], [20.0, 2, 0.8]], "val_loss": 0.5,
                 "barrier_timeouts": [{"round": 3, "missing": [1]}],
                 "resumes": [{"iteration": 1, "offset": 4, "at": 112.0, "from": "pod-z"}]},
                {"worker_id": 1, "hostname": "pod-b", "iteration": 1, "offset": 0, "clock": 31,
                 "heartbeat": 110.0, "curve": [[9.0, 1, 0.69]]}],
            "results": [None, None]}
    base.update(over)
    return base


def test_store_view_numbers_events_and_live_point():
    v = views.store_run_view(_status())
    w0, w1 = v["workers"]
    assert w0["state"] == "running" and w1["state"] == "stale"  # heartbeat 20 s > 3 x lease 5
    assert w0["progress"] == 2.5 and w0["samples_per_s"] == 250.0
    assert w0["staleness"] == 0 and w1["staleness"] == 9  # clocks behind the freshest
    assert w0["heartbeat_age"] == 1.0 and w1["heartbeat_age"] == 20.0
    assert w0["curve"] == [[10.0, 500, 1, 0.7, None], [20.0, 1000, 2, 0.8, None]]
    assert w0["live"] == [[30.0, 250.0, 2.5, 1500.0, 3.0, 0.0, 1.0]]
    kinds = [(e["kind"], e["t"]) for e in v["events"]]
    # the resume at wall 112 (12 s after setup); round 3 = minibatch 15 = pass 1.5 -> worker
    # time 15 s on its curve -> wall 129 - 100 - 20 + 15 = 24 s after setup
    assert kinds == [("resume", 12.0), ("barrier timeout", 24.0)]
    assert "pod-z" in v["events"][0]["text"]
    assert v["state"] == "running" and v["config"]["store_url"] == "memcached://x:1"


def test_store_view_of_a_finished_run_uses_the_results():
    st = _status(done=True, stop={"worker_id": 0, "reason": "target", "iteration": 3,
                                  "accuracy": 0.86})
    st["results"] = [{"accuracy": 0.8612, "finished": 140.0, "stop_reason": "target",
                      "reached": True},
                     {"accuracy": 0.85, "finished": 141.0, "stop_reason": "stopped by worker 0"}]
    v = views.store_run_view(st)
    assert [w["accuracy"] for w in v["workers"]] == [0.8612, 0.85]
    assert all(w["state"] == "done" for w in v["workers"]) and v["elapsed"] == 41.0
    assert {e["kind"] for e in v["events"]} >= {"stop", "stop signal"}
    assert views.clean({"a": float("nan"), "b": [float("inf"), 1.5]}) == {"a": None,
                                                                          "b": [None, 1.5]}


def test_store_view_reads_a_metrics_ring_when_the_state_keeps_one():
    st = _status()
    ring0 = [[105.0, 10, 500, 1.0, 1, 0, 100, 50, 0, 10], [110.0, 20, 1000, 2.0, 2, 0, 200, 100,
                                                            1, 20]]
    ring1 = [[104.0, 5, 250, 1.0, 0, 5, 60, 30, 0, 15]]
    st["progress"][0]["series"] = ring0
    st["progress"][1]["series"] = ring1
    live = views.store_run_view(st)["workers"][0]["live"]
    assert live[:2] == [[5.0, 500.0, 1.0, 150.0, 0.0, 5.0, None],
                        [10.0, 500.0, 2.0, 300.0, 1.0, 0.0, None]]


def test_p2p_view_from_real_metrics_files(tmp_path):
    run = tmp_path / "p2p-1"
    for rank in (0, 1):
        m = MetricsWriter(run, rank)
        m.write({"kind": "start", "config": {"hidden": 100, "batch_size": 10, "serverless": False,
                                             "target_accuracy": 0.8, "data": "/d/split-2"},
                 "params": 79510, "batches": 30, "time": 500.0})
        for ep in (1, 2):
            m.write({"kind": "step", "compute_s": 0.1})
            m.write({"kind": "epoch", "epoch": ep, "t": 2.0 * ep, "compute_s": 1.0 + rank,
                     "send_s": 0.2, "recv_s": 0.3, "update_s": 0.1, "val_s": 0.05,
                     "barrier_s": 0.4, "bytes_sent": 1000, "loss": 0.9, "val_loss": 0.8 / ep,
                     "test_accuracy": [0.75, 0.8][ep - 1]})
        if rank == 0:
            m.write({"kind": "result", "reason": "target", "reached": True,
                     "test_accuracy": 0.8, "t": 4.0})
        m.close()
    peers = Sources(lambda: None, tmp_path).p2p_run("p2p-1")
    v = views.p2p_run_view("p2p-1", peers, mtime=time.time(), now=time.time())
    assert v["state"] == "running" and v["workers_count"] == 2 and v["kind"] == "p2p"
    assert v["phases"][0] == {"epoch": 1, "compute": 1.5, "send": 0.2, "receive": 0.3,
                              "update": 0.1, "barrier": 0.4, "validate": 0.05}
    assert v["workers"][0]["curve"][1] == [4.0, 600.0, 2.0, 0.8, 0.4]
    assert v["workers"][0]["state"] == "done" and v["events"][0]["kind"] == "stop"
    old = views.p2p_run_view("p2p-1", peers, mtime=0.0, now=1e6)
    assert old["state"] == "incomplete"  # no result from peer 1, files long unchanged


def test_bench_suite_view_and_the_runs_list(tmp_path):
    records = [{"stack": "emnist1282", "batch_size": 128, "workers": 2, "round": 1,
                "run_id": "r-a", "seconds": 3.0, "reached": True, "target": 0.85,
                "dataset": "fashion-mnist", "started": "2026-11-23T20:48:25+00:00",
                "results": [{"worker_id": 0, "accuracy": 0.86, "iterations": 4,
                             "curve": [[1.0, 1, 0.8], [2.0, 2, 0.86]]}]},
               {"stack": "emnist1284", "workers": 4, "round": 1, "error": "deploy: boom"}]
    path = tmp_path / "suite.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    src = Sources(lambda: None, None, [path])
    assert src.bench_suite("suite") == records
    v = views.bench_suite_view("suite", records)
    assert v["state"] == "1 runs, 1 failed" and v["workers"][0]["curve"][1] == [
        2.0, None, 2.0, 0.86, None]
    assert v["records"][1]["error"] == "deploy: boom"
    rows = views.run_list([{"run_id": "s1", "started": 2e9, "state": "running"}], [],
                          [{"suite": "suite", "records_list": records}], now=2e9)
    assert [(r["source"], r["id"]) for r in rows] == [("store", "s1"), ("bench", "suite")]
    assert rows[1]["workers"] == "2-4"


# -- the /ui routes on a real gateway ----------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(tmp_path_factory, memcached):
    tmp = tmp_path_factory.mktemp("uigw")
    env = {"STORE_URL": memcached, "DATA_LOCATION": str(tmp / "shards"), "TRAIN_REPLICAS": "2",
           "GRAD_REPLICAS": "1", "EMNIST_HOME": str(tmp / "home")}
    with local_gateway(tmp, env) as gw:
        yield gw


def test_pages_and_assets_carry_a_strict_csp(gateway):
    r = requests.get(gateway.url + "/ui/", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert '<script src="/ui/static/common.js"' in r.text and "<script>" not in r.text
    js = requests.get(gateway.url + "/ui/static/run.js", timeout=10)
    assert js.headers["Content-Type"].startswith("text/javascript") and "innerHTML" not in js.text
    for path in ("/ui/static/../app.py", "/ui/static/nope.js", "/ui/static/.hidden",
                 "/ui/nope", "/ui/static/%2e%2e%2fapp.py"):
        assert requests.get(gateway.url + path, timeout=10).status_code == 404, path
    assert requests.get(gateway.url + "/ui", timeout=10, allow_redirects=False
                        ).headers["Location"].endswith("/ui/")


def test_ui_endpoints_refuse_other_origins_and_rebound_hosts(gateway):
    for headers in ({"Origin": "http://evil.example"}, {"Host": "evil.example"},
                    {"Sec-Fetch-Site": "cross-site"}):
        for path in ("/ui/", "/ui/api/runs"):
            r = requests.get(gateway.url + path, headers=headers, timeout=10)
            assert r.status_code == 403, (path, headers)
    same = requests.get(gateway.url + "/ui/api/runs", timeout=10,
                        headers={"Origin": gateway.url, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200


def test_runs_list_through_emnist_setup(gateway):
    start = gateway.invoke("emnist-setup", {"dataset": "synthetic", "number_of_workers": 1,
                                            "iterations": 1}, timeout=60)
    run_id = start.json()["run_id"]
    deadline = time.monotonic() + 60
    while True:
        listing = requests.get(gateway.url + "/ui/api/runs", timeout=30).json()
        row = next(r for r in listing["runs"] if r["id"] == run_id)
        if row["state"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert row["state"] == "done" and row["source"] == "store" and row["workers"] == 1
    assert listing["errors"] == []
    view = requests.get(gateway.url + "/ui/api/run", params={"source": "store", "id": run_id},
                        timeout=30).json()
    assert view["id"] == run_id and view["workers"][0]["state"] == "done"
    status = requests.get(f"{gateway.url}/function/emnist-setup",
                          params={"run_id": run_id}, timeout=30).json()
    assert view["workers"][0]["accuracy"] == status["results"][0]["accuracy"]
    for query, code in (({"runs": "1", "limit": "0"}, 400), ({"runs": "1", "limit": "x"}, 400),
                        ({"runs": "1", "limit": "\u00b2"}, 400), ({"runs": "1"}, 200)):
        r = requests.get(f"{gateway.url}/function/emnist-setup", params=query, timeout=30)
        assert r.status_code == code, (query, r.text)
    bad = requests.get(gateway.url + "/ui/api/run", params={"source": "store", "id": "<x>"},
                       timeout=30)
    assert bad.status_code == 400 and "not a valid run id" in bad.json()["error"]
    gone = requests.get(gateway.url + "/ui/api/run", params={"source": "store", "id": "nope"},
                        timeout=30)
    assert gone.status_code == 404 and "unknown run id" in gone.json()["error"]
    assert requests.get(gateway.url + "/ui/api/run", params={"source": "x", "id": "a"},
                        timeout=30).status_code == 400


def test_ui_needs_the_gateway_password_when_one_is_set(tmp_path, memcached):
    env = {"STORE_URL": memcached, "DATA_LOCATION": str(tmp_path / "shards"),
           "TRAIN_REPLICAS": "0", "GRAD_REPLICAS": "0", "OPENFAAS_PASSWORD": "s3cret",
           "EMNIST_HOME": str(tmp_path / "home")}
    with local_gateway(tmp_path, env) as gw:
        for path in ("/ui", "/ui/", "/ui/api/runs", "/ui/static/common.js"):
            r = requests.get(gw.url + path, timeout=10, allow_redirects=False)
            assert r.status_code == 401, path
            assert r.headers["WWW-Authenticate"] == 'Basic realm="Restricted"'
        ok = requests.get(gw.url + "/ui/api/runs", auth=("admin", "s3cret"), timeout=30)
        assert ok.status_code == 200 and ok.json()["errors"] == []
        assert requests.get(gw.url + "/ui/", auth=("admin", "nope"), timeout=10
                            ).status_code == 401


# -- emnist dashboard: the same pages for a gateway elsewhere, through a relay ------------------

@pytest.mark.parametrize("method,path,query,expected", [
    ("GET", "/system/functions", "", "/system/functions"),
    ("GET", "/system/logs", "name=a&follow=true&tail=5", "/system/logs?name=a&tail=5&follow=false"),
    ("GET", "/system/function/emnist-train", "", "/system/function/emnist-train"),
    ("POST", "/system/scale-function/emnist-train", "", "/system/scale-function/emnist-train"),
    ("POST", "/function/emnist-setup", "runs=1", "/function/emnist-setup?runs=1"),
    ("POST", "/system/functions", "", None), ("DELETE", "/system/functions", "", None),
    ("PUT", "/system/secrets", "", None), ("GET", "/system/scale-function/x", "", None),
    ("GET", "/function/../system/functions", "", None), ("PATCH", "/function/a", "", None),
    ("GET", "/system/function/a/b", "", None), ("GET", "/healthz", "", None),
])
def test_the_relay_forwards_only_what_the_pages_use(method, path, query, expected):
    assert relay_target(method, path, query) == expected


@contextmanager
def running(app: Dashboard):
    """`emnist dashboard`'s server on a free port, closed after."""
    server, url = make_server(app, "127.0.0.1", 0)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        yield url
    finally:
        server.close()
        th.join(10)


@pytest.fixture
def dashboard(gateway):
    with running(Dashboard(gateway.url, bench_files=[])) as url:
        yield url


def test_dashboard_reads_runs_and_relays_scale_to_the_gateway(gateway, dashboard):
    runs = requests.get(dashboard + "/ui/api/runs", timeout=30).json()
    assert runs["errors"] == [] and any(r["source"] == "store" for r in runs["runs"])
    page = requests.get(dashboard + "/ui/", timeout=10)
    assert page.status_code == 200 and "default-src 'none'" in page.headers[
        "Content-Security-Policy"]
    fns = requests.get(dashboard + "/system/functions", timeout=10).json()
    assert {f["name"] for f in fns} >= {"emnist-setup", "emnist-train", "emnist-grad"}
    r = requests.post(dashboard + "/system/scale-function/emnist-grad", timeout=60,
                      json={"serviceName": "emnist-grad", "replicas": 2,
                            "namespace": "openfaas-fn"})
    assert r.status_code == 202
    assert gateway.get_function("emnist-grad")["replicas"] == 2
    text = requests.post(dashboard + "/system/scale-function/emnist-grad", data="{}",
                         headers={"Content-Type": "text/plain"},
                         timeout=10)  # not JSON: the gateway's own 415 comes back
    assert text.status_code == 415
    gateway.scale("emnist-grad", 1)
    for headers in ({"Origin": "http://evil.example"}, {"Host": "evil.example:80"}):
        assert requests.post(dashboard + "/system/scale-function/emnist-grad", timeout=10,
                             headers=headers, json={"replicas": 0}).status_code == 403
    assert gateway.get_function("emnist-grad")["replicas"] == 1
    assert requests.delete(dashboard + "/system/functions", timeout=10,
                           json={"functionName": "emnist-grad"}).status_code == 404


def test_dashboard_with_a_password_requires_it_and_passes_it_on(tmp_path, memcached):
    env = {"STORE_URL": memcached, "DATA_LOCATION": str(tmp_path / "shards"),
           "TRAIN_REPLICAS": "0", "GRAD_REPLICAS": "0", "OPENFAAS_PASSWORD": "pw2",
           "EMNIST_HOME": str(tmp_path / "home")}
    with local_gateway(tmp_path, env) as gw:
        with running(Dashboard(gw.url, auth=("admin", "pw2"), bench_files=[])) as url:
            _check_password(url)


def _check_password(url: str) -> None:
    assert requests.get(url + "/ui/", timeout=10).status_code == 401
    assert requests.get(url + "/system/functions", timeout=10).status_code == 401
    fns = requests.get(url + "/system/functions", auth=("admin", "pw2"), timeout=10)
    assert fns.status_code == 200 and isinstance(fns.json(), list)


def test_dashboard_refuses_the_network_without_a_password():
    with pytest.raises(ValueError, match="without a password"):
        serve(Dashboard("http://127.0.0.1:1"), "0.0.0.0", 0)
    r = CliRunner().invoke(main, ["dashboard", "--host", "0.0.0.0", "--port", "0"],
                           env={"OPENFAAS_PASSWORD": ""})
    assert r.exit_code == 1 and "without a password" in r.output
    help_ = CliRunner().invoke(main, ["dashboard", "--help"])
    assert help_.exit_code == 0 and "--gateway" in help_.output


def test_dashboard_reports_an_unreachable_gateway_as_an_error(tmp_path):
    app = Dashboard(f"http://127.0.0.1:{free_port()}", bench_files=[], p2p_dir=tmp_path)
    with running(app) as url:
        runs = requests.get(url + "/ui/api/runs", timeout=30).json()
        assert runs["runs"] == [] and "cannot be reached" in runs["errors"][0]
        assert requests.get(url + "/system/functions", timeout=30).status_code == 502
        run = requests.get(url + "/ui/api/run", params={"source": "store", "id": "a"},
                           timeout=30)
        assert run.status_code == 502 and str(Path.home()) not in run.text
