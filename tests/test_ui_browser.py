"""The dashboard in a real browser: Debian's Chromium, headless, driven by selenium through the
system chromedriver (nothing downloads a browser), against a real local gateway with its own
memcached and real 2-worker runs on Fashion-MNIST.

Screenshots of the run and compare pages are saved under the pytest temporary directory
(``ui-screenshots*``), printed at the end of each test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from emnist.p2p.metrics import MetricsWriter
from emnist.store import ParameterStore, open_kv
from emnist.train.runindex import record_run
from emnist.ui.server import Dashboard, make_server
from tests.servers import free_port, local_gateway, start_memcached

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SLOW_RUN = {"alpha": 0.002, "iterations": 12, "batch_size": 50, "number_of_workers": 2,
            "target_accuracy": 0.99, "dataset": "fashion-mnist"}
XSS = "<img src=x onerror=window.__xss=1>"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Its own memcached (the run index is store-wide) and a local gateway using it."""
    tmp = tmp_path_factory.mktemp("uibrowser")
    port = free_port()
    mc = start_memcached(port, 128)
    url = f"memcached://127.0.0.1:{port}"
    env = {"STORE_URL": url, "DATA_LOCATION": str(tmp / "shards"), "TRAIN_REPLICAS": "2",
           "GRAD_REPLICAS": "1", "EMNIST_HOME": str(tmp / "home")}
    try:
        with local_gateway(tmp, env) as gw:
            yield gw, url, tmp / "home"
    finally:
        mc.kill()
        mc.wait(10)


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="emnist-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1400,2200"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return tmp_path_factory.mktemp("ui-screenshots")


def wait(driver, condition, timeout: float = 60, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def fresh(driver, selector: str, read, missing=None):
    """``read(the found elements)``, found and read again if a re-render replaced them
    between the two (the pages re-render on every poll); ``missing`` if none match."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            found = css(driver, selector)
            return read(found) if found else missing
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector} kept being replaced")


def text(driver, selector: str) -> str:
    return fresh(driver, selector, lambda found: found[0].text, "")


def click(driver, selector: str) -> None:
    """Click the element, found again if a re-render replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException

    def clicked(d) -> bool:
        try:
            found = css(d, selector)
            if found:
                found[0].click()
                return True
        except StaleElementReferenceException:
            pass
        return False

    wait(driver, clicked, message=f"cannot click {selector}")


def points(driver, chart: str) -> int:
    return fresh(driver, f'div.chart[data-chart="{chart}"]',
                 lambda found: int(found[0].get_attribute("data-points")), -1)


def start(gw, **over) -> str:
    resp = gw.invoke("emnist-setup", {**SLOW_RUN, **over}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["run_id"]


def status(gw, run_id: str) -> dict:
    return gw.invoke("emnist-setup", None, method="GET", query={"run_id": run_id},
                     timeout=30).json()


def wait_done(gw, run_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while not (st := status(gw, run_id))["done"]:
        assert time.monotonic() < deadline, f"run {run_id} did not finish"
        time.sleep(0.2)
    return st


def test_a_live_run_appears_its_charts_grow_and_show_the_results(stack, browser, shots):
    gw, _, _ = stack
    run_id = start(gw)
    browser.get(gw.url + "/ui/")
    row = f'tr[data-source="store"][data-id="{run_id}"]'
    wait(browser, lambda d: css(d, row), message="the run is not in the list")
    click(browser, row + " a.run-link")
    wait(browser, lambda d: "/ui/run?" in d.current_url and points(d, "acc-time") >= 0)
    # sample the page while the run trains: its accuracy chart must gain points (one per
    # worker and pass) between two moments at which the page still says "running"
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 120
    while not seen or seen[-1][0] != "done":
        assert time.monotonic() < deadline, f"the page never showed the run done: {seen[-5:]}"
        seen.append((text(browser, "#run-state"), points(browser, "acc-time")))
        time.sleep(0.1)
    live = [n for st, n in seen if st == "running" and n > 0]
    assert live and max(live) > min(live), f"no growth seen while running: {seen}"
    final = wait_done(gw, run_id)
    for w, result in enumerate(final["results"]):
        assert text(browser, f'#workers-table td.acc[data-worker="{w}"]') \
            == f"{result['accuracy']:.4f}"
    curve_points = sum(len(r["curve"]) for r in final["results"])
    # every pass of both workers, plus the target line's two ends
    wait(browser, lambda d: points(d, "acc-time") == curve_points + 2)
    assert points(browser, "samples-rate") >= 2 and points(browser, "store-bytes") >= 2
    hosts = fresh(browser, "#workers-table td.host", lambda found: {c.text for c in found})
    assert hosts == {r["hostname"] for r in final["results"]}
    assert len(css(browser, "#events-table tbody tr")) >= 2  # each worker's stop
    browser.save_screenshot(str(shots / "dashboard-run.png"))
    # opened again after the end, the live charts still have each worker's history: the
    # metrics ring its state keeps (one sample a second at most) plus its final numbers
    browser.refresh()
    wait(browser, lambda d: text(d, "#run-state") == "done")
    wait(browser, lambda d: points(d, "samples-rate") >= 2 * 2)
    assert points(browser, "loss-time") == curve_points  # validation loss per pass
    print(f"run page screenshot: {shots / 'dashboard-run.png'}")


def test_two_runs_are_compared_on_one_chart(stack, browser, shots):
    gw, _, _ = stack
    fast = start(gw, alpha=0.2, iterations=3, target_accuracy=0.8)
    slow = start(gw, alpha=0.01, iterations=3)
    runs = [wait_done(gw, fast), wait_done(gw, slow)]
    browser.get(gw.url + "/ui/")
    for run_id in (fast, slow):
        click(browser, f'tr[data-source="store"][data-id="{run_id}"] input[type="checkbox"]')
    click(browser, "#compare-btn")
    wait(browser, lambda d: "/ui/compare?" in d.current_url)
    expected = sum(len(r["curve"]) for st in runs for r in st["results"])
    wait(browser, lambda d: points(d, "cmp-acc-time") == expected,
         message="the compare chart does not show every worker's curve")
    ids = fresh(browser, "#compare-table tbody tr",
                lambda rows: [r.get_attribute("data-id") for r in rows])
    assert ids == [fast, slow]
    series = css(browser, 'div.chart[data-chart="cmp-acc-time"] g.series')
    assert len(series) == 4  # 2 runs x 2 workers
    browser.save_screenshot(str(shots / "dashboard-compare.png"))
    print(f"compare page screenshot: {shots / 'dashboard-compare.png'}")


def test_scaling_from_the_page_changes_the_replica_count(stack, browser):
    gw, _, _ = stack
    assert gw.get_function("emnist-grad")["replicas"] == 1
    browser.get(gw.url + "/ui/")
    click(browser, 'button[data-action="scale"][data-fn="emnist-grad"]')
    field = wait(browser, lambda d: css(d, "#scale-replicas"))[0]
    field.clear()
    field.send_keys("2")
    css(browser, "#scale-apply")[0].click()
    wait(browser, lambda d: "scaled to 2" in text(d, "#scale-msg"), timeout=60,
         message="the scale call did not succeed")
    fn = gw.get_function("emnist-grad")
    assert fn["replicas"] == 2 and fn["availableReplicas"] == 2
    cell = 'tr[data-fn="emnist-grad"] td.replicas'
    wait(browser, lambda d: text(d, cell) == "2 / 2")
    gw.scale("emnist-grad", 1)


def test_invoke_and_logs_from_the_page(stack, browser):
    gw, _, _ = stack
    run_id = start(gw, iterations=1, alpha=0.2)
    browser.get(gw.url + "/ui/")
    click(browser, 'button[data-action="invoke"][data-fn="emnist-setup"]')
    from selenium.webdriver.support.ui import Select

    Select(wait(browser, lambda d: css(d, "#invoke-method"))[0]).select_by_value("GET")
    css(browser, "#invoke-query")[0].send_keys(f"run_id={run_id}")
    css(browser, "#invoke-send")[0].click()
    wait(browser, lambda d: run_id in text(d, "#invoke-out"))
    assert text(browser, "#invoke-meta").startswith("HTTP 200")
    click(browser, 'button[data-action="logs"][data-fn="emnist-setup"]')
    wait(browser, lambda d: f"Run {run_id}" in text(d, "#logs-out"),
         message="the setup's log line is not shown")


def _craft(store_url: str, home: Path) -> None:
    """Strings with HTML where the pages show text: in the store (as if a run wrote them)
    and in a p2p run's metrics files."""
    kv = open_kv(store_url)
    now = time.time()
    # a run document passes the functions' checks (a config with HTML in its dataset or
    # model is refused as a forgery: xss-bad), so the HTML sits where a store writer could
    # still put it and a page shows it: the run index, the worker's state
    state = {"run_id": "xss-run", "workers": 1, "started": now - 5, "num_classes": 10,
             "steps_per_pass": 10,
             "config": {"algorithm": "downpour", "dataset": "fashion-mnist", "model": "mlp",
                        "batch_size": 10, "target_accuracy": 0.9}}
    store = ParameterStore(kv, "xss-run")
    store.put_doc("run", state)
    store.put_doc("worker:0", {"worker_id": 0, "hostname": XSS,
                               "stop_reason": "<script>window.__xss=4</script>",
                               "curve": [[1.0, 1, 0.5]], "heartbeat": now, "seconds": 2.0,
                               "resumes": [{"iteration": 0, "offset": 1, "at": now - 2,
                                            "from": XSS}]})
    record_run(kv, {**state, "config": {**state["config"], "dataset": XSS, "model": XSS}})
    bad = {**state, "run_id": "xss-bad", "config": {**state["config"], "dataset": XSS}}
    ParameterStore(kv, "xss-bad").put_doc("run", bad)
    kv.close()
    m = MetricsWriter(home / "p2p-runs" / "xss-p2p", 0)
    m.write({"kind": "start", "config": {"hidden": 10, "batch_size": 10, "data": XSS},
             "params": 1, "batches": 1, "time": now})
    m.write({"kind": "result", "reason": "timeout", "error": XSS, "t": 1.0})
    m.close()


def _no_markup(driver) -> None:
    assert driver.execute_script("return typeof window.__xss") == "undefined"
    assert driver.execute_script(
        "return document.querySelectorAll('main img, main script').length") == 0


def test_html_in_run_ids_names_and_errors_is_shown_as_text(stack, browser):
    gw, store_url, home = stack
    _craft(store_url, home)
    browser.get(gw.url + "/ui/")
    row = 'tr[data-source="store"][data-id="xss-run"]'
    wait(browser, lambda d: css(d, row) and css(d, 'tr[data-source="p2p"][data-id="xss-p2p"]'))
    assert XSS in text(browser, row)  # the model and dataset, literally
    assert XSS in text(browser, 'tr[data-id="xss-p2p"]')
    _no_markup(browser)
    browser.get(gw.url + "/ui/run?source=store&id=xss-run")
    wait(browser, lambda d: css(d, "#workers-table td.host"))
    assert text(browser, "#workers-table td.host") == XSS
    assert text(browser, "#workers-table td.stop") == "<script>window.__xss=4</script>"
    assert XSS in text(browser, "#events-table")
    assert "fashion-mnist" in text(browser, "#summary")
    _no_markup(browser)
    browser.get(gw.url + "/ui/run?source=store&id=xss-bad")  # refused, shown as text
    wait(browser, lambda d: "dataset" in text(d, "#status"))
    _no_markup(browser)
    browser.get(gw.url + "/ui/run?source=p2p&id=xss-p2p")
    wait(browser, lambda d: css(d, "#events-table"))
    assert XSS in text(browser, "#events-table")
    _no_markup(browser)
    # a run id with HTML never reaches the store's keys: the page shows the refusal as text
    browser.get(gw.url + "/ui/run?source=store&id=" + XSS.replace(" ", "%20"))
    wait(browser, lambda d: "not a valid run id" in text(d, "#status"))
    _no_markup(browser)


def test_emnist_dashboard_serves_the_same_pages_through_the_gateway(stack, browser, tmp_path):
    """`emnist dashboard`'s server, for the module's gateway: runs through emnist-setup's GET,
    functions through the relay, and a benchmark results file whose records carry HTML."""
    gw, _, _ = stack
    results = tmp_path / "bench.jsonl"
    results.write_text(json.dumps({
        "stack": XSS, "batch_size": 100, "workers": 2, "round": 1, "run_id": XSS,
        "seconds": 1.5, "reached": False, "dataset": "fashion-mnist",
        "started": "2026-12-01T10:00:00+00:00", "error": "<script>window.__xss=7</script>",
        "results": [{"worker_id": 0, "accuracy": 0.5, "hostname": XSS,
                     "curve": [[1.0, 1, 0.5]]}]}) + "\n")
    server, url = make_server(Dashboard(gw.url, bench_files=[results]), "127.0.0.1", 0)
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        browser.get(url + "/ui/")
        wait(browser, lambda d: css(d, 'tr[data-fn="emnist-setup"]'),
             message="no functions through the relay")
        wait(browser, lambda d: css(d, 'tr[data-source="store"]') and css(
            d, 'tr[data-source="bench"][data-id="bench"]'), message="runs missing")
        click(browser, 'tr[data-source="bench"][data-id="bench"] a.run-link')
        wait(browser, lambda d: css(d, "#records-table td.record-run"))
        assert text(browser, "#records-table td.record-run") == XSS
        assert XSS in text(browser, "#records-table")
        assert "<script>window.__xss=7</script>" in text(browser, "#records-table")
        _no_markup(browser)
    finally:
        server.close()
        th.join(10)


def test_with_a_password_the_pages_and_their_calls_are_authenticated(browser, tmp_path):
    """The gateway's own password: the browser logs in once (here in the URL) and the page's
    calls to /ui/api and /system carry it; scaling from the page works."""
    env = {"STORE_URL": "memcached://127.0.0.1:1", "DATA_LOCATION": str(tmp_path / "shards"),
           "TRAIN_REPLICAS": "0", "GRAD_REPLICAS": "1", "OPENFAAS_PASSWORD": "pw-ui",
           "EMNIST_HOME": str(tmp_path / "home")}
    with local_gateway(tmp_path, env) as gw:
        gw.auth = ("admin", "pw-ui")
        port = gw.url.rsplit(":", 1)[1]
        browser.get(f"http://admin:pw-ui@127.0.0.1:{port}/ui/")
        click(browser, 'button[data-action="scale"][data-fn="emnist-grad"]')
        field = wait(browser, lambda d: css(d, "#scale-replicas"))[0]
        field.clear()
        field.send_keys("2")
        click(browser, "#scale-apply")
        wait(browser, lambda d: "scaled to 2" in text(d, "#scale-msg"), timeout=60,
             message="the scale call did not succeed")
        assert gw.get_function("emnist-grad")["replicas"] == 2
        # the runs list answered too: the store is unreachable, said as text, not a 401
        wait(browser, lambda d: "Downpour/averaging runs" in text(d, "#run-errors"))
    browser.get("about:blank")
