// emnist dashboard: what every page shares. Everything shown is built with the DOM
// (createElement + textContent, createElementNS for SVG); no HTML string ever carries data.
"use strict";

const UI = (() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#2f6fdb", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285",
                   "#e67700", "#5c940d", "#364fc7", "#a61e4d", "#087f5b", "#495057"];
  const NAMESPACE = "openfaas-fn";

  // el("td", {className: "num"}, "text", node, ...): strings become text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "className") node.className = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
      else if (k in node && typeof v !== "string") node[k] = v;
      else node.setAttribute(k, String(v));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const c of children.flat()) {
      if (c === undefined || c === null || c === false) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null) node.setAttribute(k, String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function replace(node, ...children) {
    return append(clear(node), children);
  }

  // -- requests (same origin; the browser sends the gateway's basic auth if one was given) --

  class HttpError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function request(method, url, body, headers) {
    const init = {method, credentials: "same-origin", cache: "no-store",
                  headers: Object.assign({}, headers || {})};
    if (body !== undefined) {
      init.body = typeof body === "string" ? body : JSON.stringify(body);
      if (!init.headers["Content-Type"]) init.headers["Content-Type"] = "application/json";
    }
    // from the origin, never the page's URL: a page opened as http://user:pw@host/... would
    // otherwise pass its credentials into the URL, which fetch refuses
    return fetch(new URL(url, location.origin), init);
  }

  async function getJSON(url) {
    const resp = await request("GET", url);
    const text = await resp.text();
    let data = null;
    try { data = JSON.parse(text); } catch (e) { data = null; }
    if (!resp.ok) {
      const msg = data && typeof data.error === "string" ? data.error : text.trim();
      throw new HttpError(resp.status, `HTTP ${resp.status}: ${msg.slice(0, 300)}`);
    }
    return data;
  }

  // poll(fn): fn returns true to go on, false to stop; errors back off (doubling to `max`),
  // and so does an unchanged answer (fn returns "same").
  function poll(fn, opts) {
    const min = (opts && opts.min) || 1000, max = (opts && opts.max) || 30000;
    let delay = min, timer = null, stopped = false, running = false;
    async function tick() {
      if (running) return;
      running = true;
      let again = true;
      try {
        const out = await fn();
        if (out === false) again = false;
        delay = out === "same" ? Math.min(max, delay * 1.5) : min;
        setStatus("");
      } catch (e) {
        delay = Math.min(max, delay * 2);
        setStatus(`${e.message} (retrying in ${Math.round(delay / 1000)}s)`, true);
      }
      running = false;
      if (again && !stopped) timer = setTimeout(tick, delay);
    }
    tick();
    return {stop() { stopped = true; clearTimeout(timer); },
            now() { clearTimeout(timer); stopped = false; tick(); }};
  }

  function setStatus(text, bad) {
    const node = document.getElementById("status");
    if (!node) return;
    node.textContent = text || `updated ${new Date().toLocaleTimeString()}`;
    node.classList.toggle("error", !!bad);
  }

  // -- formatting -----------------------------------------------------------------------

  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function fmt(x, digits) {
    if (!isNum(x)) return "-";
    return digits === undefined ? String(x) : x.toFixed(digits);
  }
  function fmtInt(x) { return isNum(x) ? Math.round(x).toLocaleString("en-US") : "-"; }
  function fmtAcc(x) { return isNum(x) ? x.toFixed(4) : "-"; }
  function fmtSecs(x) {
    if (!isNum(x)) return "-";
    if (x < 120) return `${x.toFixed(1)} s`;
    if (x < 7200) return `${Math.floor(x / 60)} min ${Math.round(x % 60)} s`;
    return `${(x / 3600).toFixed(1)} h`;
  }
  function fmtBytes(x) {
    if (!isNum(x)) return "-";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(x) >= 1000 && i < units.length - 1) { x /= 1000; i++; }
    return `${x.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function fmtDate(epoch) {
    if (!isNum(epoch)) return "-";
    const d = new Date(epoch * 1000);
    return `${d.toLocaleDateString("en-CA")} ${d.toLocaleTimeString("en-GB")}`;
  }

  function runHref(source, id) {
    return "/ui/run?" + new URLSearchParams({source, id}).toString();
  }

  function stateCell(state) {
    const s = String(state || "unknown");
    return el("td", {className: "state-" + s.split(" ")[0].replace(/[^a-z]/g, "")}, s);
  }

  function table(headers, rows, attrs) {
    const thead = el("thead", {}, el("tr", {}, headers.map(h =>
      el("th", {className: h.num ? "num" : ""}, h.label || h))));
    return el("table", attrs || {}, thead, el("tbody", {}, rows));
  }

  // -- charts: hand-made SVG ------------------------------------------------------------

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    const span = hi - lo, step0 = span / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= step0) || step0;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    }
    return out;
  }

  function tickText(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100 || v === 0) return v.toFixed(0);
    if (a >= 1) return String(+v.toFixed(2));
    return String(+v.toFixed(4));
  }

  // lineChart({id, title, xLabel, yLabel, series: [{name, color, points: [[x, y]], dash}],
  //            markers: [{x, text, color}], yMin, yMax}) -> a div.chart
  function lineChart(spec) {
    const W = 560, H = 250, L = 58, R = 14, T = 10, B = 38;
    const series = (spec.series || []).map(s => ({...s,
      points: (s.points || []).filter(p => isNum(p[0]) && isNum(p[1]))}));
    const all = series.flatMap(s => s.points);
    const marks = (spec.markers || []).filter(m => isNum(m.x));
    const box = el("div", {className: "chart", dataset: {chart: spec.id || "",
                                                         points: String(all.length)}});
    box.appendChild(el("h3", {}, spec.title));
    if (!all.length) {
      box.appendChild(el("div", {className: "empty"}, spec.empty || "no data yet"));
      return box;
    }
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
                             "data-chart": spec.id || "", "data-points": all.length});
    root.appendChild(svg("title", {}, spec.title));
    box.appendChild(root);
    let x0 = Math.min(...all.map(p => p[0]), ...marks.map(m => m.x));
    let x1 = Math.max(...all.map(p => p[0]), ...marks.map(m => m.x));
    let y0 = isNum(spec.yMin) ? spec.yMin : Math.min(...all.map(p => p[1]));
    let y1 = isNum(spec.yMax) ? spec.yMax : Math.max(...all.map(p => p[1]));
    if (spec.zeroX !== false) x0 = Math.min(0, x0);
    if (x1 <= x0) x1 = x0 + 1;
    if (y1 <= y0) { y1 = y0 + (Math.abs(y0) || 1) * 0.1; y0 = y0 - (Math.abs(y0) || 1) * 0.1; }
    const xt = niceTicks(x0, x1, 6), yt = niceTicks(y0, y1, 5);
    x0 = Math.min(x0, xt[0]); x1 = Math.max(x1, xt[xt.length - 1]);
    if (!isNum(spec.yMin)) y0 = Math.min(y0, yt[0]);
    if (!isNum(spec.yMax)) y1 = Math.max(y1, yt[yt.length - 1]);
    const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
    for (const v of yt) {
      if (v < y0 || v > y1) continue;
      root.appendChild(svg("line", {class: "grid", x1: L, x2: W - R, y1: sy(v), y2: sy(v)}));
      root.appendChild(svg("text", {x: L - 6, y: sy(v) + 4, "text-anchor": "end"}, tickText(v)));
    }
    for (const v of xt) {
      if (v < x0 || v > x1) continue;
      root.appendChild(svg("line", {class: "grid", x1: sx(v), x2: sx(v), y1: T, y2: H - B}));
      root.appendChild(svg("text", {x: sx(v), y: H - B + 15, "text-anchor": "middle"},
                           tickText(v)));
    }
    root.appendChild(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
    root.appendChild(svg("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
    root.appendChild(svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"},
                         spec.xLabel || ""));
    root.appendChild(svg("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
                                  transform: `rotate(-90 12 ${(T + H - B) / 2})`},
                         spec.yLabel || ""));
    for (const m of marks) {
      const g = svg("g", {class: "marker"});
      g.appendChild(svg("title", {}, m.text));
      g.appendChild(svg("line", {x1: sx(m.x), x2: sx(m.x), y1: T, y2: H - B,
                                 stroke: m.color || "#9a6700", "stroke-dasharray": "3 3"}));
      g.appendChild(svg("circle", {cx: sx(m.x), cy: T + 4, r: 3.5, fill: m.color || "#9a6700"}));
      root.appendChild(g);
    }
    for (const s of series) {
      if (!s.points.length) continue;
      const pts = s.points.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      const g = svg("g", {class: "series", "data-name": s.name, "data-points": s.points.length});
      g.appendChild(svg("title", {}, s.name));
      if (!spec.scatter) {
        g.appendChild(svg("polyline", {points: pts, fill: "none", stroke: s.color,
                                       "stroke-width": 1.8, "stroke-dasharray": s.dash || null}));
      }
      if (spec.scatter || s.points.length <= 120) {
        for (const p of s.points) {
          g.appendChild(svg("circle", {cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1),
                                       r: spec.scatter ? 4 : 2.4, fill: s.color}));
        }
      }
      root.appendChild(g);
    }
    box.appendChild(legend(series));
    return box;
  }

  // stackedBars({id, title, xLabel, yLabel, bars: [{x, parts: [[name, value]]}]})
  function stackedBars(spec) {
    const W = 560, H = 250, L = 58, R = 14, T = 10, B = 38;
    const bars = spec.bars || [];
    const names = bars.length ? bars[0].parts.map(p => p[0]) : [];
    const box = el("div", {className: "chart", dataset: {chart: spec.id || ""}});
    box.appendChild(el("h3", {}, spec.title));
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "data-chart": spec.id || "",
                             "data-points": bars.length});
    box.appendChild(root);
    if (!bars.length) {
      box.appendChild(el("div", {className: "empty"}, "no data yet"));
      return box;
    }
    const top = Math.max(...bars.map(b => b.parts.reduce((a, p) => a + (isNum(p[1]) ? p[1] : 0),
                                                            0)), 1e-9);
    const yt = niceTicks(0, top, 5), y1 = Math.max(top, yt[yt.length - 1]);
    const sy = y => H - B - y / y1 * (H - T - B);
    const bw = (W - L - R) / bars.length;
    for (const v of yt) {
      root.appendChild(svg("line", {class: "grid", x1: L, x2: W - R, y1: sy(v), y2: sy(v)}));
      root.appendChild(svg("text", {x: L - 6, y: sy(v) + 4, "text-anchor": "end"}, tickText(v)));
    }
    bars.forEach((b, i) => {
      let acc = 0;
      const g = svg("g", {class: "bar"});
      g.appendChild(svg("title", {}, `${spec.xLabel || ""} ${b.x}: ` + b.parts.map(
        p => `${p[0]} ${fmt(p[1], 3)}`).join(", ")));
      b.parts.forEach((p, j) => {
        const v = isNum(p[1]) ? p[1] : 0;
        g.appendChild(svg("rect", {x: (L + i * bw + bw * 0.12).toFixed(1),
                                   y: sy(acc + v).toFixed(1), width: (bw * 0.76).toFixed(1),
                                   height: Math.max(0, sy(acc) - sy(acc + v)).toFixed(1),
                                   fill: PALETTE[j % PALETTE.length]}));
        acc += v;
      });
      if (bars.length <= 40 || i % Math.ceil(bars.length / 20) === 0) {
        g.appendChild(svg("text", {x: L + i * bw + bw / 2, y: H - B + 15, "text-anchor": "middle"},
                          String(b.x)));
      }
      root.appendChild(g);
    });
    root.appendChild(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
    root.appendChild(svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"},
                         spec.xLabel || ""));
    root.appendChild(svg("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
                                  transform: `rotate(-90 12 ${(T + H - B) / 2})`},
                         spec.yLabel || ""));
    box.appendChild(legend(names.map((n, j) => ({name: n, color: PALETTE[j % PALETTE.length]}))));
    return box;
  }

  function swatch(c, dash) {
    return svg("svg", {viewBox: "0 0 14 10", class: "swatch"},
               svg("line", {x1: 0, x2: 14, y1: 5, y2: 5, stroke: c, "stroke-width": 3,
                            "stroke-dasharray": dash ? "3 2" : null}));
  }

  function legend(series) {
    return el("div", {className: "legend"}, series.map(s => el("span", {},
      swatch(s.color, s.dash), s.name)));
  }

  function color(i) { return PALETTE[((i % PALETTE.length) + PALETTE.length) % PALETTE.length]; }

  return {el, svg, clear, replace, append, request, getJSON, poll, setStatus, HttpError,
          isNum, fmt, fmtInt, fmtAcc, fmtSecs, fmtBytes, fmtDate, runHref, stateCell, table,
          lineChart, stackedBars, color, swatch, NAMESPACE};
})();
