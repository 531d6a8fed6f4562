// The front page: the gateway's functions (invoke, scale, logs, as the OpenFaaS portal does)
// and every run the dashboard's sources know.
"use strict";

(() => {
  const {el, replace, request, getJSON, poll, fmtInt, fmtAcc, fmtSecs, fmtDate, runHref,
         stateCell, table, NAMESPACE} = UI;
  const selected = new Set();
  let panel = null;  // {name, mode: "invoke" | "scale" | "logs"}
  let functions = [];
  let fnPoller = null;

  // -- functions ------------------------------------------------------------------------

  async function loadFunctions() {
    const data = await getJSON("/system/functions");
    functions = Array.isArray(data) ? data : [];
    functions.sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const rows = functions.map(fn => el("tr", {dataset: {fn: String(fn.name)}},
      el("td", {className: "text"}, String(fn.name)),
      el("td", {className: "text muted"}, String(fn.image || "")),
      el("td", {className: "num"}, fmtInt(fn.invocationCount)),
      el("td", {className: "num replicas"}, `${fmtInt(fn.availableReplicas)} / ` +
                                            `${fmtInt(fn.replicas)}`),
      el("td", {}, ["invoke", "scale", "logs"].map(mode => el("button", {
        className: panel && panel.name === fn.name && panel.mode === mode ? "primary" : "",
        dataset: {action: mode, fn: String(fn.name)},
        on: {click: () => openPanel(String(fn.name), mode)}}, mode)))));
    replace(document.getElementById("fn-table"), rows.length ? table(
      ["function", "image", {label: "invocations", num: true},
       {label: "replicas (available / wanted)", num: true}, ""], rows, {id: "functions-table"})
      : el("p", {className: "muted"}, "no functions deployed"));
    return true;
  }

  function openPanel(name, mode) {
    panel = {name, mode};
    const box = replace(document.getElementById("fn-panel"));
    box.className = "panel";
    box.dataset.fn = name;
    box.appendChild(el("h3", {}, `${mode}: ${name}`));
    ({invoke: invokePanel, scale: scalePanel, logs: logsPanel})[mode](box, name);
    loadFunctions().catch(() => {});
  }

  function invokePanel(box, name) {
    const method = el("select", {id: "invoke-method"}, ["POST", "GET", "PUT", "DELETE"].map(
      m => el("option", {value: m}, m)));
    const query = el("input", {id: "invoke-query", placeholder: "query, e.g. runs=1", size: 30});
    const body = el("textarea", {id: "invoke-body", placeholder: "request body (JSON or text)"});
    const out = el("pre", {id: "invoke-out"}, "");
    const meta = el("div", {className: "muted", id: "invoke-meta"});
    const send = el("button", {className: "primary", id: "invoke-send", on: {click: async () => {
      send.disabled = true;
      try {
        const q = query.value.trim().replace(/^\?/, "");
        const url = `/function/${encodeURIComponent(name)}` + (q ? `?${q}` : "");
        const hasBody = method.value !== "GET" && body.value !== "";
        const resp = await request(method.value, url, hasBody ? body.value : undefined,
                                   hasBody ? {"Content-Type": contentType(body.value)} : {});
        const text = await resp.text();
        meta.textContent = `HTTP ${resp.status}  call ${resp.headers.get("X-Call-Id") || "-"}` +
          `  ${resp.headers.get("X-Duration-Seconds") || "-"} s`;
        out.textContent = pretty(text);
      } catch (e) {
        meta.textContent = `failed: ${e.message}`;
      } finally {
        send.disabled = false;
      }
    }}}, "Send");
    UI.append(box, [el("div", {className: "row"}, method, query, send), body, meta, out]);
  }

  function contentType(text) {
    try { JSON.parse(text); return "application/json"; } catch (e) { return "text/plain"; }
  }

  function pretty(text) {
    try { return JSON.stringify(JSON.parse(text), null, 1); } catch (e) { return text; }
  }

  function scalePanel(box, name) {
    const fn = functions.find(f => f.name === name) || {};
    const input = el("input", {id: "scale-replicas", type: "number", min: 0, step: 1,
                               value: String(fn.replicas ?? 1)});
    const msg = el("div", {className: "muted", id: "scale-msg"});
    const apply = el("button", {className: "primary", id: "scale-apply", on: {click: async () => {
      const n = Number(input.value);
      if (!Number.isInteger(n) || n < 0) { msg.textContent = "replicas: an integer >= 0"; return; }
      apply.disabled = true;
      msg.textContent = `scaling ${name} to ${n}...`;
      try {
        const resp = await request("POST", `/system/scale-function/${encodeURIComponent(name)}`,
                                   {serviceName: name, replicas: n, namespace: NAMESPACE});
        const text = (await resp.text()).trim();
        msg.textContent = resp.ok ? `HTTP ${resp.status}: ${name} scaled to ${n}`
                                  : `HTTP ${resp.status}: ${text}`;
        msg.classList.toggle("error", !resp.ok);
      } catch (e) {
        msg.textContent = `failed: ${e.message}`;
      } finally {
        apply.disabled = false;
        if (fnPoller) fnPoller.now();
      }
    }}}, "Scale");
    UI.append(box, [el("div", {className: "row"}, el("label", {}, "replicas "), input, apply),
                    msg]);
  }

  function logsPanel(box, name) {
    const instance = el("select", {id: "logs-instance"}, el("option", {value: ""}, "every replica"));
    const tail = el("input", {id: "logs-tail", type: "number", min: 1, max: 1000, value: "200"});
    const out = el("pre", {id: "logs-out"}, "loading...");
    const known = new Set();
    async function load() {
      const q = new URLSearchParams({name, namespace: NAMESPACE, follow: "false",
                                     tail: String(Math.min(1000, Math.max(1, +tail.value || 200)))});
      if (instance.value) q.set("instance", instance.value);
      const resp = await request("GET", `/system/logs?${q}`);
      const text = await resp.text();
      if (!resp.ok) { out.textContent = `HTTP ${resp.status}: ${text.trim()}`; return; }
      const lines = [];
      for (const line of text.split("\n")) {
        if (!line.trim()) continue;
        try {
          const m = JSON.parse(line);
          const inst = String(m.instance || "");
          if (inst && !known.has(inst)) {
            known.add(inst);
            instance.appendChild(el("option", {value: inst}, inst));
          }
          lines.push(`${String(m.timestamp || "")} ${inst} ${String(m.text || "")}`);
        } catch (e) { /* not a log message */ }
      }
      out.textContent = lines.join("\n") || "(no log lines)";
      out.scrollTop = out.scrollHeight;
    }
    const refresh = el("button", {on: {click: () => load().catch(e => {
      out.textContent = e.message; })}}, "Refresh");
    instance.addEventListener("change", () => load().catch(() => {}));
    UI.append(box, [el("div", {className: "row"}, el("label", {}, "replica "), instance,
                       el("label", {}, "last lines "), tail, refresh), out]);
    load().catch(e => { out.textContent = e.message; });
  }

  // -- runs -----------------------------------------------------------------------------

  function key(r) { return `${r.source}:${r.id}`; }

  function updateCompare() {
    const btn = document.getElementById("compare-btn");
    btn.disabled = selected.size < 2;
    btn.textContent = `Compare selected (${selected.size})`;
  }

  let lastRuns = "";
  async function loadRuns() {
    const data = await getJSON("/ui/api/runs");
    const text = JSON.stringify(data);
    if (text === lastRuns) return "same";
    lastRuns = text;
    replace(document.getElementById("run-errors"),
            (data.errors || []).map(e => el("p", {}, String(e))));
    const runs = data.runs || [];
    document.getElementById("run-count").textContent = `${runs.length} runs`;
    const rows = runs.map(r => el("tr", {dataset: {source: String(r.source), id: String(r.id)}},
      el("td", {}, el("input", {type: "checkbox", checked: selected.has(key(r)),
                                 on: {change: ev => {
                                   if (ev.target.checked) selected.add(key(r));
                                   else selected.delete(key(r));
                                   updateCompare();
                                 }}})),
      el("td", {className: "text"}, el("a", {href: runHref(String(r.source), String(r.id)),
                                             className: "run-link"}, String(r.id))),
      el("td", {}, String(r.kind || "")),
      stateCell(r.state),
      el("td", {className: "text"}, String(r.model ?? "")),
      el("td", {className: "text"}, String(r.dataset ?? "")),
      el("td", {className: "num"}, String(r.workers ?? "-")),
      el("td", {className: "num"}, fmtDate(r.started)),
      el("td", {className: "num"}, fmtSecs(r.elapsed)),
      el("td", {className: "num"}, fmtAcc(r.accuracy) + (r.reached ? " \u2713" : ""))));
    replace(document.getElementById("run-table"), rows.length ? table(
      ["", "run", "kind", "state", "model", "dataset", {label: "workers", num: true},
       {label: "started", num: true}, {label: "elapsed", num: true},
       {label: "best accuracy", num: true}], rows, {id: "runs-table"})
      : el("p", {className: "muted"}, "no runs yet"));
    return true;
  }

  document.getElementById("compare-btn").addEventListener("click", () => {
    const q = new URLSearchParams();
    for (const k of selected) q.append("run", k);
    location.href = `/ui/compare?${q}`;
  });

  fnPoller = poll(loadFunctions, {min: 3000, max: 30000});
  poll(loadRuns, {min: 2000, max: 20000});
})();
