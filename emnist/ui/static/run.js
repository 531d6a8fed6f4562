// One run: per-worker numbers, training curves, live metrics, events, p2p phases, bench
// records. Polls its view while the run is live (back-off on errors and unchanged answers).
"use strict";

(() => {
  const {el, replace, getJSON, poll, isNum, fmt, fmtInt, fmtAcc, fmtSecs, fmtBytes, fmtDate,
         runHref, stateCell, table, lineChart, stackedBars, color} = UI;
  const params = new URLSearchParams(location.search);
  const source = params.get("source") || "store";
  const id = params.get("id") || "";
  const MAX_LIVE = 4000;
  const live = new Map();  // worker id -> [[t, samples/s, progress, bytes, retries, staleness, hb]]
  let last = "";

  document.getElementById("compare-link").href =
    "/ui/compare?" + new URLSearchParams({run: `${source}:${id}`}).toString();
  document.title = `${id} - emnist dashboard`;

  function mergeLive(workers) {
    for (const w of workers) {
      const k = String(w.id);
      const pts = live.get(k) || [];
      for (const p of w.live || []) {
        if (!pts.length || (isNum(p[0]) && p[0] > pts[pts.length - 1][0])) pts.push(p);
      }
      if (pts.length > MAX_LIVE) pts.splice(0, pts.length - MAX_LIVE);
      live.set(k, pts);
    }
  }

  function summary(v) {
    const best = Math.max(...(v.workers || []).map(w => isNum(w.accuracy) ? w.accuracy : -1));
    const item = (label, value, cls) => el("div", {className: cls || ""},
                                          el("span", {}, label), String(value));
    return [item("kind", v.kind), el("div", {}, el("span", {}, "state"),
                                     el("b", {className: `state-${v.state}`, id: "run-state"},
                                        String(v.state))),
            item("model", v.model || "-"), item("dataset", v.dataset || "-"),
            item("workers", v.workers_count ?? "-"), item("started", fmtDate(v.started)),
            item("elapsed", fmtSecs(v.elapsed)), item("target", fmtAcc(v.target)),
            item("best accuracy", best >= 0 ? fmtAcc(best) : "-")];
  }

  function workerTable(v) {
    if (v.source === "bench") {
      return table(["record / worker", "host", {label: "accuracy", num: true},
                    {label: "passes", num: true}, {label: "time", num: true},
                    {label: "samples/s", num: true}, "stopped by", "run"],
        v.workers.map(w => el("tr", {},
          el("td", {className: "text"}, String(w.id)), el("td", {className: "text"}, w.host),
          el("td", {className: "num acc", dataset: {worker: String(w.id)}}, fmtAcc(w.accuracy)),
          el("td", {className: "num"}, fmt(w.iteration)), el("td", {className: "num"},
                                                             fmtSecs(w.seconds)),
          el("td", {className: "num"}, fmtInt(w.samples_per_s)),
          el("td", {className: "text"}, w.stop_reason),
          el("td", {className: "text"}, w.run_id ? el("a", {href: runHref("store", w.run_id)},
                                                          w.run_id) : "-"))),
        {id: "workers-table"});
    }
    return table(["worker", "host", "state", {label: "pass", num: true},
                  {label: "accuracy", num: true}, {label: "loss", num: true},
                  {label: "samples", num: true}, {label: "samples/s", num: true},
                  {label: "store bytes", num: true}, {label: "push retries", num: true},
                  {label: "clock", num: true}, {label: "staleness", num: true},
                  {label: "heartbeat age", num: true}, {label: "invocations", num: true},
                  "stopped by"],
      v.workers.map(w => el("tr", {dataset: {worker: String(w.id)}},
        el("td", {}, String(w.id)), el("td", {className: "text host"}, w.host),
        stateCell(w.state), el("td", {className: "num"}, fmt(w.progress, 2)),
        el("td", {className: "num acc", dataset: {worker: String(w.id)}}, fmtAcc(w.accuracy)),
        el("td", {className: "num"}, fmt(w.loss, 4)),
        el("td", {className: "num"}, fmtInt(w.samples)),
        el("td", {className: "num"}, fmtInt(w.samples_per_s)),
        el("td", {className: "num"}, fmtBytes((w.bytes_fetched || 0) + (w.bytes_pushed || 0))),
        el("td", {className: "num"}, fmtInt(w.push_retries)),
        el("td", {className: "num"}, fmtInt(w.clock)),
        el("td", {className: "num"}, fmtInt(w.staleness)),
        el("td", {className: "num"}, w.state === "done" ? "-" : fmtSecs(w.heartbeat_age)),
        el("td", {className: "num"}, fmtInt(w.invocations)),
        el("td", {className: "text stop"}, w.stop_reason))),
      {id: "workers-table"});
  }

  function curveSeries(v, xi, yi) {
    return v.workers.map((w, i) => ({name: `worker ${w.id}`, color: color(i),
      points: (w.curve || []).map(c => [c[xi], c[yi]])}));
  }

  function targetSeries(v, series) {
    if (!isNum(v.target)) return [];
    const xs = series.flatMap(s => s.points.map(p => p[0])).filter(isNum);
    if (!xs.length) return [];
    return [{name: `target ${fmtAcc(v.target)}`, color: "#868e96", dash: "5 4",
             points: [[Math.min(0, ...xs), v.target], [Math.max(...xs), v.target]]}];
  }

  function markers(v) {
    return (v.events || []).filter(e => isNum(e.t)).map(e => ({
      x: e.t, text: `${fmtSecs(e.t)}${e.approx ? " (approx.)" : ""}: ${e.text}`,
      color: e.worker === null || e.worker === undefined ? "#9a6700" : color(
        v.workers.findIndex(w => w.id === e.worker))}));
  }

  function trainingCharts(v) {
    const accT = curveSeries(v, 0, 3), accS = curveSeries(v, 1, 3);
    const timeLabel = v.source === "p2p" ? "seconds of training" : "seconds (worker's clock)";
    return [
      lineChart({id: "acc-time", title: "test accuracy against time", xLabel: timeLabel,
                 yLabel: "accuracy", series: accT.concat(targetSeries(v, accT))}),
      lineChart({id: "acc-samples", title: "test accuracy against samples",
                 xLabel: "samples trained", yLabel: "accuracy",
                 series: accS.concat(targetSeries(v, accS))}),
      lineChart({id: "loss-time", title: "validation loss against time", xLabel: timeLabel,
                 yLabel: "loss", series: curveSeries(v, 0, 4),
                 empty: "no loss per pass recorded (only the latest: see the table)"}),
      lineChart({id: "loss-samples", title: "validation loss against samples",
                 xLabel: "samples trained", yLabel: "loss", series: curveSeries(v, 1, 4),
                 empty: "no loss per pass recorded (only the latest: see the table)"}),
    ];
  }

  function liveCharts(v) {
    const x = v.source === "p2p" ? "seconds of training" : "seconds since setup";
    const m = markers(v);
    const one = (chartId, title, yLabel, idx) => lineChart({
      id: chartId, title, xLabel: x, yLabel, markers: m,
      series: v.workers.map((w, i) => ({name: `worker ${w.id}`, color: color(i),
        points: (live.get(String(w.id)) || []).map(p => [p[0], p[idx]])}))});
    const charts = [one("samples-rate", "samples per second", "samples/s", 1),
                    one("progress", v.source === "p2p" ? "epoch" : "passes (iteration)",
                        "passes", 2),
                    one("store-bytes", v.source === "p2p" ? "bytes sent" : "store bytes moved",
                        "bytes", 3)];
    if (v.source !== "p2p") {
      charts.push(one("push-retries", "push retries (conflicts)", "retries", 4),
                  one("staleness", "staleness (clocks behind the freshest worker)", "clocks", 5),
                  one("heartbeat-age", "heartbeat age", "seconds", 6));
    }
    return charts;
  }

  function eventCharts(v) {
    const kinds = [...new Set((v.events || []).map(e => e.kind))];
    const lane = e => e.worker === null || e.worker === undefined ? -1 : e.worker;
    return [lineChart({id: "timeline", title: "events on the timeline (worker -1: the run)",
      xLabel: v.source === "p2p" ? "seconds of training" : "seconds since setup",
      yLabel: "worker", scatter: true, yMin: -1.5,
      yMax: Math.max(0, ...v.workers.map(w => typeof w.id === "number" ? w.id : 0)) + 0.5,
      series: kinds.map((k, i) => ({name: k, color: color(i + 3),
        points: v.events.filter(e => e.kind === k && isNum(e.t)).map(e => [e.t, lane(e)])})),
      empty: "no events yet"})];
  }

  function eventTable(v) {
    const evs = v.events || [];
    if (!evs.length) return el("p", {className: "muted"}, "no events");
    return table([{label: "time", num: true}, "worker", "event", "what happened"],
      evs.map(e => el("tr", {}, el("td", {className: "num"},
                                   isNum(e.t) ? fmtSecs(e.t) + (e.approx ? " ~" : "") : "-"),
                       el("td", {}, e.worker === null || e.worker === undefined ? "run"
                                    : String(e.worker)),
                       el("td", {}, String(e.kind)), el("td", {className: "text"},
                                                        String(e.text)))), {id: "events-table"});
  }

  function phaseParts(p) {
    return [["compute", p.compute], ["send", p.send], ["receive", p.receive],
            ["update", p.update], ["barrier", p.barrier], ["validate", p.validate]];
  }

  function phaseCharts(v) {
    return [stackedBars({id: "phases", title: "seconds per epoch by phase", xLabel: "epoch",
                         yLabel: "seconds", bars: v.phases.map(p => ({x: p.epoch,
                                                                      parts: phaseParts(p)}))}),
            el("div", {className: "chart"}, table(["epoch"].concat(phaseParts(v.phases[0]).map(
              p => ({label: p[0], num: true}))), v.phases.map(p => el("tr", {},
                el("td", {}, String(p.epoch)),
                phaseParts(p).map(x => el("td", {className: "num"}, fmt(x[1], 3))))),
              {id: "phases-table"}))];
  }

  function recordTable(v) {
    return el("div", {className: "card"}, table(["stack", {label: "batch", num: true},
      {label: "workers", num: true}, {label: "round", num: true}, "run",
      {label: "seconds", num: true}, "reached", {label: "accuracy", num: true}, "error"],
      (v.records || []).map(r => el("tr", {}, el("td", {className: "text"}, String(r.stack)),
        el("td", {className: "num"}, String(r.batch_size ?? "-")),
        el("td", {className: "num"}, String(r.workers ?? "-")),
        el("td", {className: "num"}, String(r.round ?? "-")),
        el("td", {className: "text record-run"}, r.run_id ? el("a", {href: runHref("store",
                                                                     r.run_id)}, r.run_id) : "-"),
        el("td", {className: "num"}, fmtSecs(r.seconds)), el("td", {}, r.reached ? "yes" : "no"),
        el("td", {className: "num"}, fmtAcc(r.accuracy)),
        el("td", {className: "text error"}, String(r.error || "")))), {id: "records-table"}));
  }

  function configTable(v) {
    const rows = Object.entries(v.config || {}).map(([k, val]) => el("tr", {},
      el("td", {}, k), el("td", {className: "text"}, val === null ? "-" : String(val))));
    return rows.length ? table(["setting", "value"], rows) : el("p", {className: "muted"},
                                                                "no configuration recorded");
  }

  function render(v) {
    document.getElementById("title").textContent = `${v.kind} run ${v.id}`;
    replace(document.getElementById("summary"), summary(v));
    replace(document.getElementById("workers"), workerTable(v));
    replace(document.getElementById("charts-training"), trainingCharts(v));
    replace(document.getElementById("charts-live"), v.source === "bench" ? [] : liveCharts(v));
    const hasPhases = (v.phases || []).length > 0;
    document.getElementById("phases-title").hidden = !hasPhases;
    replace(document.getElementById("charts-phases"), hasPhases ? phaseCharts(v) : []);
    replace(document.getElementById("charts-events"), v.source === "bench" ? [] : eventCharts(v));
    replace(document.getElementById("events"), eventTable(v));
    document.getElementById("records-title").hidden = v.source !== "bench";
    replace(document.getElementById("records"), v.source === "bench" ? recordTable(v) : []);
    replace(document.getElementById("config"), configTable(v));
  }

  async function load() {
    const v = await getJSON("/ui/api/run?" + new URLSearchParams({source, id}).toString());
    mergeLive(v.workers || []);
    const text = JSON.stringify(v);
    const changed = text !== last;
    if (changed) {
      last = text;
      render(v);
    }
    if (v.state !== "running") return false;  // finished: nothing will change
    return changed ? true : "same";
  }

  poll(load, {min: 1000, max: 15000});
})();
