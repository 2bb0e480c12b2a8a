// splitserve operator page. A client of the public JSON API only: it polls the repository
// index, each model's A/B summary, routing and experiment, keeps a few minutes of history in
// memory for the charts, and writes routing through PUT /v1/models/{m}/routing with the
// token typed in (held in a variable, never stored).
"use strict";

(() => {
  const REFRESH_MS = 3000;
  const HISTORY_S = 900;          // chart window kept in memory
  const MAX_EVENTS = 200;
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];

  let token = null;               // null: read-only; a string (maybe empty): controls on
  const models = new Map();       // name -> per-model view state

  // ---- small helpers -----------------------------------------------------------------
  const url = (path) => new URL("../" + path.replace(/^\//, ""), location.href).toString();
  const seg = (s) => encodeURIComponent(s);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const pct = (x, digits = 1) => (x === null || x === undefined) ? "–" : (100 * x).toFixed(digits) + "%";
  const ms = (x) => (x === null || x === undefined) ? "–" : (x < 10 ? x.toFixed(2) : x.toFixed(1));
  const bytes = (n) => {
    if (n === null || n === undefined) return "–";
    const u = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + u[i];
  };
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], {hour12: false});
  const num = (v, digits = 4) => (typeof v === "number" && isFinite(v)) ? String(+v.toPrecision(digits)) : "–";
  const armName = (a, fallback) => (a && typeof a === "object" && a.ref !== undefined)
    ? (typeof a.ref === "number" ? "version " + a.ref : String(a.ref)) : fallback;
  const meanN = (a) => (a && typeof a === "object") ? `${num(a.mean)} (n=${a.n ?? 0})` : "–";
  // Same words as `splitserve experiment MODEL status` (runtime/cli/ops.py).
  function differenceText(o) {
    if (typeof o.difference !== "number") return "not enough data yet";
    const iv = Array.isArray(o.interval) && o.interval.length === 2 ? ` [${num(o.interval[0])}, ${num(o.interval[1])}]` : "";
    return (o.difference > 0 ? "+" : "") + num(o.difference) + iv;
  }
  function guardrailText(name, g, cname, kname) {
    if (!g || typeof g !== "object") return String(g);
    const ev = typeof g.evidence === "number" ? `; evidence ${num(g.evidence, 3)} (alarm at ${num(g.threshold, 3)})` : "";
    if (name === "latency") {
      const q = typeof g.quantile === "number" ? "p" + +(g.quantile * 100).toPrecision(4) : "the quantile";
      const t = typeof g.latency_threshold_s === "number" ? ` = ${num(g.latency_threshold_s * 1000, 3)} ms` : "";
      const slow = typeof g.judged === "number" ? `: ${g.slow ?? 0} of ${g.judged} ${kname} requests slower` : "";
      return `${kname} ${q} vs ${num(g.max_ratio)} x ${cname}'s ${q}${t}${slow}${ev}`;
    }
    if (name === "errors") return `${kname} error rate vs ${num(g.max_ratio)} x ${cname}'s error rate${ev}`;
    return Object.entries(g).filter(([k]) => k !== "alarm")
      .map(([k, v]) => `${k}=${typeof v === "number" ? num(v) : JSON.stringify(v)}`).join(" ");
  }
  const color = (view, v) => {
    if (!view.colors.has(v)) view.colors.set(v, COLORS[view.colors.size % COLORS.length]);
    return view.colors.get(v);
  };

  async function call(method, path, body) {
    const headers = {"accept": "application/json"};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (method !== "GET" && token) headers["authorization"] = "Bearer " + token;
    const resp = await fetch(url(path), {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await resp.json(); } catch (e) { /* not JSON: keep null */ }
    return {status: resp.status, ok: resp.ok, data};
  }

  const errorText = (r) => (r.data && r.data.error) ? r.data.error : `HTTP ${r.status}`;

  // ---- the refresh loop ----------------------------------------------------------------
  // One refresh at a time: a tick asked for while one runs is folded into one more run.
  let running = null, again = false;
  function tick() {
    if (running) { again = true; return running; }
    running = refresh().finally(() => {
      running = null;
      if (again) { again = false; tick(); }
    });
    return running;
  }

  async function refresh() {
    const status = document.getElementById("status");
    try {
      const index = await call("POST", "v2/repository/index", {});
      if (!index.ok) throw new Error("repository index: " + errorText(index));
      const byModel = new Map();
      for (const row of index.data) {
        if (!byModel.has(row.name)) byModel.set(row.name, []);
        if (row.version !== "") byModel.get(row.name).push(row);
      }
      await Promise.all([...byModel.keys()].map((m) => refreshModel(m, byModel.get(m))));
      for (const [name, view] of models) {
        if (!byModel.has(name)) { view.el.remove(); models.delete(name); }
      }
      const main = document.getElementById("models");
      if (!byModel.size) main.replaceChildren(h("p", {class: "muted"}, "The repository holds no models."));
      else main.querySelector(":scope > p.muted")?.remove();
      status.textContent = `updated ${clock(Date.now() / 1000)} · every ${REFRESH_MS / 1000} s`;
      status.className = "muted";
      setBanner(null);
    } catch (e) {
      status.textContent = "not updating";
      status.className = "bad";
      setBanner("Cannot read the server: " + e.message);
    }
  }

  function setBanner(text) {
    const b = document.getElementById("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  async function refreshModel(name, indexRows) {
    const [metrics, routing, experiment] = await Promise.all([
      call("GET", `v1/models/${seg(name)}/metrics`),
      call("GET", `v1/models/${seg(name)}/routing`),
      call("GET", `v1/models/${seg(name)}/experiment`),
    ]);
    let view = models.get(name);
    if (!view) {
      view = newView(name);
      models.set(name, view);
      const main = document.getElementById("models");
      const names = [...models.keys()].sort();
      const next = names[names.indexOf(name) + 1];
      main.insertBefore(view.el, next ? models.get(next).el : null);
    }
    const now = Date.now() / 1000;
    const summary = metrics.ok ? metrics.data : {versions: []};
    const route = routing.ok ? routing.data : null;
    noteEvents(view, now, summary, route, indexRows);
    record(view, now, summary, route);
    renderHead(view, route, metrics.ok ? null : errorText(metrics));
    renderVersions(view, summary, route);
    renderCharts(view);
    renderEvents(view);
    renderExperiment(view, experiment);
    renderControls(view, summary, route);
  }

  function newView(name) {
    const el = h("section", {class: "model", id: "model-" + name, "data-model": name});
    const view = {
      name, el, colors: new Map(), history: [], events: [], states: null, routingKey: null,
      charts: {}, chartKey: null, dirty: false, controlsKey: null,
      parts: {
        head: h("header", {class: "model-head"}),
        versions: h("div", {class: "versions"}),
        charts: h("div", {class: "charts"}),
        events: h("div", {class: "events"}),
        experiment: h("div", {class: "experiment", hidden: true}),
        controls: h("div", {class: "controls"}),
      },
    };
    el.append(view.parts.head, view.parts.versions, view.parts.experiment, view.parts.charts,
              view.parts.events, view.parts.controls);
    return view;
  }

  // ---- history and events (state changes seen between polls) ---------------------------
  function noteEvents(view, now, summary, route, indexRows) {
    const states = new Map();
    for (const r of indexRows) states.set(r.version, r.state);
    for (const v of summary.versions || []) if (v.state) states.set(v.version, v.state);
    if (view.states !== null) {
      for (const [v, s] of states) {
        const before = view.states.get(v);
        if (before === undefined) addEvent(view, now, `version ${v} appeared (${s})`, "load");
        else if (before !== s) addEvent(view, now, `version ${v}: ${before} → ${s}`, s === "AVAILABLE" || s === "READY" ? "load" : "unload");
      }
      for (const v of view.states.keys()) {
        if (!states.has(v)) addEvent(view, now, `version ${v} unloaded`, "unload");
      }
    }
    view.states = states;
    const key = route ? JSON.stringify(configOf(route)) : null;
    if (view.routingKey !== null && key !== null && key !== view.routingKey) {
      addEvent(view, now, "routing changed: " + describeWeights(configOf(route)), "route");
    }
    if (key !== null) view.routingKey = key;
  }

  function addEvent(view, t, text, kind) {
    view.events.push({t, text, kind});
    if (view.events.length > MAX_EVENTS) view.events.shift();
  }

  function record(view, now, summary, route) {
    const eff = (route && route.effective && route.effective.weights) || {};
    const point = {t: now, v: {}};
    for (const row of summary.versions || []) {
      const r = row.recent || {};
      point.v[row.version] = {
        p50: r.latency_ms ? r.latency_ms.p50 : null,
        p99: r.latency_ms ? r.latency_ms.p99 : null,
        err: r.error_rate ?? null,
        share: r.observed_share ?? null,
        weight: eff[row.version] ?? 0,
      };
    }
    view.history.push(point);
    while (view.history.length && view.history[0].t < now - HISTORY_S) view.history.shift();
  }

  // ---- rendering -----------------------------------------------------------------------
  function configOf(route) {
    // The routing document minus what the server computes: what PUT accepts back.
    const out = {};
    for (const [k, v] of Object.entries(route)) {
      if (k === "model" || k === "effective" || k === "note") continue;
      if (v === null || v === undefined) continue;
      if (typeof v === "object" && !Array.isArray(v) && !Object.keys(v).length) continue;
      out[k] = v;
    }
    return out;
  }

  function describeWeights(cfg) {
    const w = cfg.weights || {};
    const keys = Object.keys(w);
    return keys.length ? keys.map((k) => `${k}=${w[k]}`).join(" ") : "no weights (latest version)";
  }

  function renderHead(view, route, error) {
    const bits = [h("h2", {}, view.name)];
    if (route && route.sticky) {
      const s = route.sticky;
      bits.push(h("span", {class: "tag"}, "sticky: " + (s.header ? "header " + s.header : "parameter " + s.parameter)));
    }
    if (route && route.shadow) {
      bits.push(h("span", {class: "tag"}, `shadow → ${route.shadow.target} (${route.shadow.percent}%)`));
    }
    const note = route && route.effective && route.effective.note;
    if (note) bits.push(h("span", {class: "note"}, note));
    if (error) bits.push(h("span", {class: "bad"}, error));
    view.parts.head.replaceChildren(...bits);
  }

  function shareBar(weight, observed) {
    const bar = h("div", {class: "share", title: `weight ${pct(weight)}, observed ${pct(observed)}`});
    bar.append(h("div", {class: "share-weight", style: null}), h("div", {class: "share-observed"}));
    // Widths through CSSOM, not a style attribute (the CSP forbids inline styles).
    bar.children[0].style.width = (100 * (weight || 0)).toFixed(1) + "%";
    bar.children[1].style.width = (100 * (observed || 0)).toFixed(1) + "%";
    return bar;
  }

  function renderVersions(view, summary, route) {
    const eff = (route && route.effective && route.effective.weights) || {};
    const head = h("tr", {},
      ["Version", "State", "Labels", "Weight", "Effective", "Observed (60 s)", "", "Requests",
       "Errors", "p50 / p99 ms (60 s)", "Batch", "Memory", "Shadow agreement"].map((c) => h("th", {}, c)));
    const rows = (summary.versions || []).map((v) => {
      const recent = v.recent || {};
      const lat = recent.latency_ms || {};
      const effective = eff[v.version] ?? v.effective_weight ?? 0;
      const state = v.state || "–";
      const sh = v.shadow;
      return h("tr", {"data-version": v.version},
        h("td", {}, h("span", {class: "swatch", "data-color": color(view, v.version)}), " ", v.version),
        h("td", {}, h("span", {class: "state state-" + state.toLowerCase()}, state),
          v.reason && state === "FAILED" ? h("div", {class: "reason"}, v.reason) : null),
        h("td", {}, (v.labels || []).map((l) => h("span", {class: "tag"}, l))),
        h("td", {class: "num", "data-field": "weight"}, v.configured_share == null ? "–" : pct(v.configured_share)),
        h("td", {class: "num", "data-field": "effective"}, pct(effective)),
        h("td", {class: "num", "data-field": "observed"}, pct(recent.observed_share)),
        h("td", {}, shareBar(effective, recent.observed_share)),
        h("td", {class: "num"}, v.requests),
        h("td", {class: "num" + (v.errors ? " bad" : "")}, v.errors ? `${v.errors} (${pct(v.error_rate, 2)})` : "0"),
        h("td", {class: "num"}, `${ms(lat.p50)} / ${ms(lat.p99)}`),
        h("td", {class: "num"}, v.mean_batch_size === null ? "–" : v.mean_batch_size.toFixed(1)),
        h("td", {class: "num"}, bytes(v.memory_bytes)),
        h("td", {class: "num"}, sh ? `${pct(sh.argmax_agreement)} of ${sh.comparisons}` : "–"));
    });
    const table = h("table", {class: "versions-table"}, h("thead", {}, head), h("tbody", {}, rows));
    if (!rows.length) {
      view.parts.versions.replaceChildren(h("p", {class: "muted"}, "No version is loaded."));
    } else {
      view.parts.versions.replaceChildren(table);
    }
    for (const sw of table.querySelectorAll(".swatch")) sw.style.background = sw.dataset.color;
  }

  // Vertical markers for load/unload/routing events, drawn on every chart's time axis.
  function eventsPlugin(view) {
    return {
      hooks: {
        draw: [(u) => {
          const ctx = u.ctx;
          const [t0, t1] = [u.scales.x.min, u.scales.x.max];
          ctx.save();
          ctx.lineWidth = 1;
          ctx.font = `${10 * devicePixelRatio}px sans-serif`;
          for (const e of view.events) {
            if (e.t < t0 || e.t > t1) continue;
            const x = Math.round(u.valToPos(e.t, "x", true));
            ctx.strokeStyle = e.kind === "unload" ? "#b91c1c" : e.kind === "route" ? "#a16207" : "#15803d";
            ctx.setLineDash([4 * devicePixelRatio, 3 * devicePixelRatio]);
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
          ctx.restore();
        }],
      },
    };
  }

  const CHARTS = [
    {key: "latency", title: "Latency, last 60 s (ms): p99 solid, p50 dashed",
     series: [["p99", []], ["p50", [6, 4]]]},
    {key: "share", title: "Observed share (solid) vs effective weight (dashed)",
     series: [["share", []], ["weight", [6, 4]]], percent: true},
    {key: "errors", title: "Error rate, last 60 s", series: [["err", []]], percent: true},
  ];

  function renderCharts(view) {
    if (typeof uPlot === "undefined") return;
    const versions = [...new Set(view.history.flatMap((p) => Object.keys(p.v)))].sort((a, b) => a - b);
    const key = versions.join(",");
    const width = Math.max(280, Math.floor((view.parts.charts.clientWidth || 900) / 3) - 16);
    if (key !== view.chartKey || width !== view.chartWidth) {
      for (const c of Object.values(view.charts)) c.destroy();
      view.charts = {};
      view.parts.charts.replaceChildren();
      view.chartKey = key;
      view.chartWidth = width;
      if (!versions.length) return;
      for (const spec of CHARTS) {
        const series = [{}];
        for (const v of versions) {
          for (const [field, dash] of spec.series) {
            series.push({
              label: `v${v} ${field}`, stroke: color(view, v), width: 2, dash, spanGaps: false,
              value: (u, x) => x === null ? "–" : spec.percent ? pct(x) : ms(x),
            });
          }
        }
        const box = h("div", {class: "chart", "data-chart": spec.key}, h("h3", {}, spec.title));
        view.parts.charts.append(box);
        view.charts[spec.key] = new uPlot({
          width, height: 170, series, plugins: [eventsPlugin(view)], legend: {show: true},
          // At least 90 s on the time axis, so a fresh page is not all sub-second ticks.
          scales: {x: {time: true, range: (u, lo, hi) => [Math.min(lo, hi - 90), hi]}, y: spec.percent ? {range: [0, 1]} : {auto: true}},
          axes: [{}, {values: (u, ticks) => ticks.map((t) => spec.percent ? (100 * t).toFixed(0) + "%" : t)}],
        }, chartData(view, versions, spec), box);
      }
      return;
    }
    for (const spec of CHARTS) view.charts[spec.key].setData(chartData(view, versions, spec));
  }

  function chartData(view, versions, spec) {
    const data = [view.history.map((p) => p.t)];
    for (const v of versions) {
      for (const [field] of spec.series) {
        data.push(view.history.map((p) => (p.v[v] ? p.v[v][field] ?? null : null)));
      }
    }
    return data;
  }

  function renderEvents(view) {
    if (!view.events.length) {
      view.parts.events.replaceChildren(h("h3", {}, "Events"),
        h("p", {class: "muted"}, "No load, unload or routing change seen since this page opened."));
      return;
    }
    const items = view.events.slice(-12).reverse().map((e) =>
      h("li", {class: "event-" + e.kind}, h("time", {}, clock(e.t)), " ", e.text));
    view.parts.events.replaceChildren(h("h3", {}, "Events (seen by this page)"), h("ol", {}, items));
  }

  // ---- experiment (GET /v1/models/{m}/experiment; hidden while it answers 404) -----------
  function renderExperiment(view, r) {
    const box = view.parts.experiment;
    if (!r.ok || !r.data || r.data.state === "none") {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const x = r.data;
    box.hidden = false;
    const steps = Array.isArray(x.steps) ? ` of ${x.steps.length} (${x.steps.join(" → ")}%)` : "";
    const facts = [
      ["State", h("span", {class: "state state-" + String(x.state).toLowerCase()}, x.state)],
      ["Step", (x.step ?? "–") + steps],
      ["Candidate weight", x.candidate_weight === undefined ? "–" : x.candidate_weight + "%"],
    ];
    if (x.paused_by) facts.push(["Paused by", String(x.paused_by)]);
    const arm = (a) => (a && typeof a === "object")
      ? `${a.ref}${a.version !== undefined ? " (v" + a.version + ")" : ""}: ${a.requests ?? 0} requests, ` +
        `${a.errors ?? 0} errors` + (a.error_rate !== null && a.error_rate !== undefined ? ` (${pct(a.error_rate, 2)})` : "")
      : String(a);
    if (x.control !== undefined) facts.push(["Control", arm(x.control)]);
    if (x.candidate !== undefined) facts.push(["Candidate", arm(x.candidate)]);
    const dl = h("dl", {}, facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const parts = [h("h3", {}, "Experiment"), dl];
    const cname = armName(x.control, "control"), kname = armName(x.candidate, "candidate");
    const outcomes = Array.isArray(x.outcomes) ? x.outcomes : [];
    if (outcomes.length) {
      parts.push(h("table", {class: "outcomes"},
        h("thead", {}, h("tr", {}, ["Outcome", `Control (${cname})`, `Candidate (${kname})`,
                                    "Difference [interval]", "Verdict"].map((t) => h("th", {}, t)))),
        h("tbody", {}, outcomes.map((o) => h("tr", {"data-outcome": o.metric},
          h("td", {}, `${o.metric}` + (o.goal ? ` (${o.goal})` : "")),
          h("td", {"data-field": "control"}, meanN(o.control)),
          h("td", {"data-field": "candidate"}, meanN(o.candidate)),
          h("td", {"data-field": "difference"}, differenceText(o)),
          h("td", {"data-field": "verdict", class: o.verdict === "worse" ? "bad" : ""}, o.verdict ?? "–"))))));
    }
    const guard = x.guardrails;
    if (guard && typeof guard === "object" && !Array.isArray(guard)) {
      const rows = Object.entries(guard).map(([name, g]) => h("tr", {"data-guardrail": name},
        h("td", {}, name),
        h("td", {class: g && g.alarm ? "bad" : ""}, g && g.alarm ? "ALARM" : "ok"),
        h("td", {"data-field": "compared"}, guardrailText(name, g, cname, kname))));
      parts.push(h("table", {class: "guardrails"}, h("thead", {}, h("tr", {}, h("th", {}, "Guardrail"),
        h("th", {}, "Status"), h("th", {}, "What is compared"))), h("tbody", {}, rows)));
    }
    if (x.srm && typeof x.srm === "object") {
      parts.push(h("p", {class: x.srm.flagged ? "bad" : "muted"},
        `Sample ratio check: p = ${x.srm.p_value ?? "–"}` + (x.srm.flagged ? " (mismatch flagged)" : "")));
    }
    const decisions = Array.isArray(x.decisions) ? x.decisions : [];
    parts.push(h("h4", {}, "Decisions"));
    if (!decisions.length) parts.push(h("p", {class: "muted"}, "No decision yet."));
    else {
      parts.push(h("ol", {class: "decisions"}, decisions.slice().reverse().map((d) => {
        const t = d.time ?? d.at ?? d.t;
        const when = typeof t === "number" ? clock(t) : (t ? String(t) : "");
        return h("li", {}, h("time", {}, when), " ", h("b", {}, d.action ?? d.decision ?? d.kind ?? ""),
                 d.by ? ` (${d.by})` : "", " ", d.reason ?? "");
      })));
    }
    const actions = h("div", {class: "actions"}, ["promote", "rollback", "pause", "resume", "retry"].map((a) =>
      h("button", {type: "button", class: "exp-" + a, disabled: token === null,
                   onclick: () => experimentAction(view, a)}, a)));
    parts.push(actions, h("p", {class: "result", "data-result": "experiment"}, view.expResult || ""));
    box.replaceChildren(...parts);
  }

  async function experimentAction(view, action) {
    const r = await call("POST", `v1/models/${seg(view.name)}/experiment/${action}`, {});
    view.expResult = r.ok ? `${action}: done` : `${action} refused: ${errorText(r)}`;
    await tick();
  }

  // ---- controls: weights and labels, written with PUT /v1/models/{m}/routing ------------
  function renderControls(view, summary, route) {
    const box = view.parts.controls;
    if (!route) { box.replaceChildren(); return; }
    const versions = (summary.versions || []).map((v) => v.version);
    const cfg = configOf(route);
    const key = JSON.stringify([cfg, versions, token !== null]);
    if (view.dirty || key === view.controlsKey) return;  // never clobber what is being typed
    view.controlsKey = key;
    const labels = cfg.labels || {};
    const weights = cfg.weights || {};
    const labelled = new Set(Object.values(labels).map(String));
    const keys = Object.keys(weights);
    for (const l of Object.keys(labels)) if (!keys.includes(l)) keys.push(l);
    for (const v of versions) if (!keys.includes(v) && !labelled.has(v)) keys.push(v);
    const ro = token === null;
    const markDirty = () => { view.dirty = true; };
    const weightRows = keys.map((k) => h("label", {class: "weight"},
      h("span", {}, /^\d+$/.test(k) ? "version " + k : k + (labels[k] !== undefined ? ` (v${labels[k]})` : "")),
      h("input", {type: "number", min: "0", step: "any", name: "weight:" + k, "data-weight": k,
                  value: weights[k] ?? 0, disabled: ro, oninput: markDirty})));
    const options = (sel) => versions.map((v) => h("option", {value: v, selected: String(sel) === v}, "v" + v));
    const labelRows = Object.keys(labels).map((l) => h("label", {class: "label-move"},
      h("span", {}, l + " →"),
      h("select", {name: "label:" + l, "data-label": l, disabled: ro, onchange: markDirty},
        options(labels[l]).length ? options(labels[l]) : h("option", {value: labels[l]}, "v" + labels[l]))));
    const newLabel = h("label", {class: "label-move"},
      h("input", {type: "text", name: "new-label", placeholder: "new label", size: 10, disabled: ro, oninput: markDirty}),
      h("span", {}, "→"),
      h("select", {name: "new-label-version", disabled: ro}, options(null)));
    const result = h("p", {class: "result", "data-result": "routing"}, view.result || "");
    const form = h("form", {class: "routing-form"},
      h("h3", {}, "Routing"),
      ro ? h("p", {class: "muted"}, "Read-only: type the server's token above and unlock to change routing.") : null,
      h("fieldset", {disabled: ro}, h("legend", {}, "Weights"), weightRows),
      h("fieldset", {disabled: ro}, h("legend", {}, "Labels"), labelRows, newLabel),
      h("div", {class: "actions"},
        h("button", {type: "submit", class: "apply", disabled: ro}, "Apply"),
        h("button", {type: "button", class: "reset", disabled: ro,
                     onclick: () => { view.dirty = false; view.controlsKey = null; renderControls(view, summary, route); }},
          "Discard changes")),
      result);
    form.addEventListener("submit", (ev) => { ev.preventDefault(); applyRouting(view, form, cfg); });
    box.replaceChildren(form);
  }

  async function applyRouting(view, form, cfg) {
    const next = JSON.parse(JSON.stringify(cfg));
    const labels = {...(cfg.labels || {})};
    for (const sel of form.querySelectorAll("select[data-label]")) labels[sel.dataset.label] = Number(sel.value);
    const name = form.querySelector("input[name=new-label]").value.trim();
    if (name) labels[name] = Number(form.querySelector("select[name=new-label-version]").value);
    const weights = {};
    const before = cfg.weights || {};
    for (const input of form.querySelectorAll("input[data-weight]")) {
      const k = input.dataset.weight;
      const w = Number(input.value);
      if (input.value.trim() === "" || !Number.isFinite(w) || w < 0) {
        view.result = `weight of ${k}: expected a number >= 0, got '${input.value}'`;
        form.querySelector(".result").textContent = view.result;
        return;
      }
      if (w > 0 || k in before) weights[k] = w;
    }
    if (Object.keys(labels).length) next.labels = labels; else delete next.labels;
    if (Object.keys(weights).length) next.weights = weights; else delete next.weights;
    const r = await call("PUT", `v1/models/${seg(view.name)}/routing`, next);
    if (r.ok) {
      const eff = (r.data.effective && r.data.effective.weights) || {};
      view.result = "applied: " + (Object.keys(eff).map((v) => `v${v} ${pct(eff[v])}`).join(", ") || "no weights") +
        (r.data.note ? " · " + r.data.note : "");
      view.dirty = false;
      view.controlsKey = null;
    } else {
      view.result = `not applied (${r.status}): ${errorText(r)}`;
    }
    form.querySelector(".result").textContent = view.result;
    await tick();
  }

  // ---- token -------------------------------------------------------------------------------
  function setToken(value) {
    const flipped = (token === null) !== (value === null);
    token = value;
    document.getElementById("lock").hidden = token === null;
    document.getElementById("unlock").textContent = token === null ? "Unlock controls" : "Use this token";
    // Locking or unlocking rebuilds the controls; a new token keeps what was typed.
    if (flipped) for (const view of models.values()) { view.controlsKey = null; view.dirty = false; }
    tick();
  }

  document.getElementById("auth").addEventListener("submit", (ev) => {
    ev.preventDefault();
    setToken(document.getElementById("token").value);
  });
  document.getElementById("lock").addEventListener("click", () => {
    document.getElementById("token").value = "";
    setToken(null);
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { for (const v of models.values()) renderCharts(v); }, 200);
  });

  // A server without a token wants none: controls on, nothing to type.
  call("GET", "ui/server.json").then((r) => {
    if (r.ok && r.data && r.data.token_required === false) {
      document.getElementById("auth").hidden = true;
      document.getElementById("no-token").hidden = false;
      setToken("");
    }
  });

  tick();
  setInterval(tick, REFRESH_MS);
})();
