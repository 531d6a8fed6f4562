// Several runs on one chart: ?run=SOURCE:ID&run=... (each run one colour, its workers dashed
// differently). Polls while any of them is live.
"use strict";

(() => {
  const {el, replace, getJSON, poll, isNum, fmtInt, fmtAcc, fmtSecs, runHref, stateCell, table,
         lineChart, color} = UI;
  const DASHES = [null, "6 3", "2 3", "8 3 2 3", "1 2"];
  const MAX_RUNS = 12;
  let chosen = new URLSearchParams(location.search).getAll("run").slice(0, MAX_RUNS);
  let last = "";

  function parse(item) {
    const at = item.indexOf(":");
    return at < 0 ? {source: "store", id: item} : {source: item.slice(0, at), id: item.slice(at + 1)};
  }

  function series(views, xi, yi) {
    return views.flatMap((v, r) => v.workers.map((w, i) => ({
      name: `${v.id} w${w.id}`, color: color(r), dash: DASHES[i % DASHES.length],
      points: (w.curve || []).map(c => [c[xi], c[yi]])})));
  }

  function summaryTable(views) {
    return table(["run", "kind", "state", "model", "dataset", {label: "workers", num: true},
                  {label: "elapsed", num: true}, {label: "best accuracy", num: true},
                  {label: "mean samples/s", num: true}],
      views.map((v, r) => {
        const accs = v.workers.map(w => w.accuracy).filter(isNum);
        const rates = v.workers.map(w => w.samples_per_s).filter(isNum);
        return el("tr", {dataset: {source: String(v.source), id: String(v.id)}},
          el("td", {className: "text"}, UI.swatch(color(r)), " ",
             el("a", {href: runHref(v.source, v.id)}, v.id)),
          el("td", {}, String(v.kind)), stateCell(v.state),
          el("td", {className: "text"}, String(v.model ?? "")),
          el("td", {className: "text"}, String(v.dataset ?? "")),
          el("td", {className: "num"}, String(v.workers_count ?? "-")),
          el("td", {className: "num"}, fmtSecs(v.elapsed)),
          el("td", {className: "num"}, accs.length ? fmtAcc(Math.max(...accs)) : "-"),
          el("td", {className: "num"}, rates.length ? fmtInt(rates.reduce((a, b) => a + b, 0)
                                                             / rates.length) : "-"));
      }), {id: "compare-table"});
  }

  async function load() {
    if (chosen.length === 0) {
      replace(document.getElementById("compare-summary"),
              el("p", {className: "muted"}, "pick two or more runs below"));
      replace(document.getElementById("compare-charts"));
      return false;
    }
    const views = [], errors = [];
    await Promise.all(chosen.map(async (item, i) => {
      const {source, id} = parse(item);
      try {
        views[i] = await getJSON("/ui/api/run?" + new URLSearchParams({source, id}).toString());
      } catch (e) {
        errors.push(`${item}: ${e.message}`);
      }
    }));
    const got = views.filter(Boolean);
    const text = JSON.stringify([got, errors]);
    if (text === last) return got.some(v => v.state === "running") ? "same" : false;
    last = text;
    replace(document.getElementById("compare-summary"), summaryTable(got),
            errors.map(e => el("p", {className: "error"}, e)));
    replace(document.getElementById("compare-charts"),
      lineChart({id: "cmp-acc-time", title: "test accuracy against time",
                 xLabel: "seconds of training", yLabel: "accuracy", series: series(got, 0, 3)}),
      lineChart({id: "cmp-acc-samples", title: "test accuracy against samples",
                 xLabel: "samples trained", yLabel: "accuracy", series: series(got, 1, 3)}),
      lineChart({id: "cmp-loss-time", title: "validation loss against time",
                 xLabel: "seconds of training", yLabel: "loss", series: series(got, 0, 4),
                 empty: "no loss per pass recorded"}),
      lineChart({id: "cmp-acc-pass", title: "test accuracy against passes",
                 xLabel: "pass (epoch)", yLabel: "accuracy", series: series(got, 2, 3)}));
    return got.some(v => v.state === "running");
  }

  async function picker() {
    const data = await getJSON("/ui/api/runs");
    const rows = (data.runs || []).map(r => {
      const item = `${r.source}:${r.id}`;
      return el("tr", {}, el("td", {}, el("input", {type: "checkbox",
        checked: chosen.includes(item), dataset: {run: item}, on: {change: ev => {
          chosen = ev.target.checked ? chosen.concat([item]).slice(0, MAX_RUNS)
                                     : chosen.filter(x => x !== item);
          const q = new URLSearchParams();
          for (const c of chosen) q.append("run", c);
          history.replaceState(null, "", `/ui/compare?${q}`);
          last = "";
          if (pollers) pollers.now();
        }}})),
        el("td", {className: "text"}, String(r.id)), el("td", {}, String(r.kind)),
        stateCell(r.state), el("td", {className: "num"}, fmtAcc(r.accuracy)));
    });
    replace(document.getElementById("picker"), rows.length ? table(["", "run", "kind", "state",
      {label: "best accuracy", num: true}], rows) : el("p", {}, "no runs"));
    document.getElementById("picker").classList.remove("muted");
  }

  const pollers = poll(load, {min: 1500, max: 15000});
  picker().catch(e => { document.getElementById("picker").textContent = e.message; });
})();
