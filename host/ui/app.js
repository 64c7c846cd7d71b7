// The weir dashboard: one page over the /v1 admin API. Everything it shows comes from /v1 or
// /metrics; these files hold no data. Writes carry the session's CSRF token.

import { h, render } from "preact";
import { useState, useEffect, useRef } from "preact/hooks";
import htm from "htm";
import uPlot from "uplot";

const html = htm.bind(h);

// ---- The API -------------------------------------------------------------------------------

const session = { csrf: null, username: null, role: null };

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function api(method, path, body, raw) {
  const headers = {};
  if (method !== "GET" && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  let payload;
  if (raw !== undefined) {
    payload = raw;
    headers["Content-Type"] = "application/wasm";
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  const text = await response.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (response.status === 401 && path !== "/v1/login" && path !== "/v1/session") {
    session.csrf = null;
    rerender();
  }
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

async function metrics() {
  const response = await fetch("/metrics", { credentials: "same-origin" });
  if (!response.ok) return [];
  return parseMetrics(await response.text());
}

// Prometheus text: `name{a="b",c="d"} value` per line.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

// ---- Shared pieces -------------------------------------------------------------------------

let rerender = () => {};

function useLoad(load, deps) {
  const [state, setState] = useState({ loading: true });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let live = true;
    load().then(
      (data) => live && setState({ data }),
      (error) => live && setState({ error }),
    );
    return () => { live = false; };
  }, [...(deps || []), tick]);
  return [state, () => setTick((t) => t + 1)];
}

function Notice({ error }) {
  if (!error) return null;
  return html`<div class="notice error" id="form-error">${error.message || String(error)}</div>`;
}

function Loading({ state, children }) {
  if (state.loading && !state.data) return html`<p class="loading">Loading…</p>`;
  if (state.error) return html`<${Notice} error=${state.error} />`;
  return children(state.data);
}

// The errors of one field: those whose JSON pointer is `path`.
function FieldErrors({ errors, path }) {
  const mine = (errors || []).filter((e) => e.path === path);
  if (!mine.length) return null;
  return html`${mine.map((e) => html`<div class="field-error" data-path=${path}>${e.message}</div>`)}`;
}

function Field({ label, path, errors, children }) {
  const failed = (errors || []).some((e) => e.path === path);
  return html`<label class=${failed ? "has-error" : ""}>
    <span>${label}</span>${children}<${FieldErrors} errors=${errors} path=${path} />
  </label>`;
}

function list(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}

// ---- Login ---------------------------------------------------------------------------------

function Login({ onIn }) {
  const [error, setError] = useState(null);
  async function submit(event) {
    event.preventDefault();
    const form = event.target;
    try {
      const answer = await api("POST", "/v1/login", {
        username: form.username.value,
        password: form.password.value,
      });
      Object.assign(session, { csrf: answer.csrf_token, username: answer.username, role: answer.role });
      onIn();
    } catch (e) {
      setError(e);
    }
  }
  return html`<form class="login" onSubmit=${submit}>
    <h1>weir</h1>
    <${Notice} error=${error} />
    <label><span>Username</span><input id="username" name="username" autocomplete="username" /></label>
    <label><span>Password</span><input id="password" name="password" type="password" autocomplete="current-password" /></label>
    <button class="primary" id="login-button" type="submit">Log in</button>
  </form>`;
}

// ---- Charts --------------------------------------------------------------------------------

// The window of samples the gateway keeps (GET /v1/metrics/history): columns that line up with
// `timestamps`. It is the gateway's own, taken on its timer, so a page opened now shows the
// last minutes at once; the page only fetches it again now and then.
function useHistory(onRefresh) {
  const [state, reload] = useLoad(() => api("GET", "/v1/metrics/history"));
  const interval = state.data ? state.data.interval_s : 10;
  useEffect(() => {
    const timer = setInterval(() => { reload(); if (onRefresh) onRefresh(); }, Math.max(5, interval) * 1000);
    return () => clearInterval(timer);
  }, [interval]);
  return state;
}

const COLORS = ["#1f6feb", "#c0392b", "#8250df", "#1a7f37"];
const CHART_HEIGHT = 170;

function formatValue(value, unit) {
  if (value == null) return "–";
  const shown = Math.abs(value) >= 100 ? value.toFixed(0) : String(+value.toPrecision(3));
  return unit === "%" ? `${shown}%` : unit ? `${shown} ${unit}` : shown;
}

// One uPlot chart: `series` ([{label, values}]) over `xs` (Unix seconds). A null value is a
// gap (no traffic, so no latency). The uPlot instance is kept on the element as `uplot`, so a
// test can read what it draws.
function Chart({ id, title, xs, series, unit }) {
  const box = useRef(null);
  const plot = useRef(null);
  const data = [xs, ...series.map((s) => s.values)];
  const shape = `${unit}|${series.map((s) => s.label).join("|")}`;
  useEffect(() => {
    const element = box.current;
    const width = () => Math.max(260, element.clientWidth);
    plot.current = new uPlot({
      width: width(),
      height: CHART_HEIGHT,
      scales: { y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      axes: [{}, { size: 64, values: (u, ticks) => ticks.map((t) => formatValue(t, unit)) }],
      series: [{}, ...series.map((s, i) => ({
        label: s.label, stroke: COLORS[i % COLORS.length], width: 2,
        value: (u, v) => formatValue(v, unit),
      }))],
    }, data, element);
    element.uplot = plot.current;
    const resize = () => plot.current.setSize({ width: width(), height: CHART_HEIGHT });
    addEventListener("resize", resize);
    return () => {
      removeEventListener("resize", resize);
      plot.current.destroy();
      plot.current = null;
      delete element.uplot;
    };
  }, [shape]);
  useEffect(() => { if (plot.current) plot.current.setData(data); });
  return html`<div class="chart"><div class="chart-title">${title}</div>
    <div class="chart-plot" id=${id} ref=${box}></div></div>`;
}

function Charts({ charts, xs }) {
  return html`<div class="charts">${charts.map((c) => html`<${Chart} key=${c.id} xs=${xs} ...${c} />`)}</div>`;
}

const sum = (values) => values.reduce((total, v) => total + (v || 0), 0);

// How much time the window covers, in words.
function windowText(h) {
  const minutes = Math.round(sum(h.seconds) / 60);
  const span = minutes >= 1 ? `the last ${minutes} minute${minutes === 1 ? "" : "s"}` : "the last minute";
  return `${span}, sampled by the gateway every ${h.interval_s} s`;
}

function NoSamples({ h }) {
  return html`<p class="muted" id="no-samples">No samples yet: the gateway takes one every
    ${h.interval_s} s and keeps the last ${h.capacity}.</p>`;
}

// ---- Overview ------------------------------------------------------------------------------

// Names of `series` (routes or plugins), busiest first by `field`.
function busiest(series, field) {
  return Object.keys(series).sort((a, b) => sum(series[b][field]) - sum(series[a][field]) || a.localeCompare(b));
}

function routeCharts(h, s) {
  const perSecond = (n, i) => n / (h.seconds[i] || h.interval_s);
  return [
    { id: "chart-rps", title: "Requests per second", unit: "/s",
      series: [{ label: "requests/s", values: s.requests.map(perSecond) }] },
    { id: "chart-errors", title: "Error rate: 5xx share of responses", unit: "%",
      series: [{ label: "5xx", values: s.requests.map((n, i) => (n ? (100 * s.status_5xx[i]) / n : null)) }] },
    { id: "chart-latency", title: "Latency, arrival to last byte", unit: "ms",
      series: [{ label: "p50", values: s.p50_ms }, { label: "p99", values: s.p99_ms }] },
  ];
}

function lastOf(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] != null) return values[i];
  return null;
}

function Traffic({ h, route: chosen, onPick: setChosen }) {
  const routes = busiest(h.routes, "requests");
  const shown = chosen && h.routes[chosen] ? h.routes[chosen] : h.overall;
  const seconds = sum(h.seconds) || 1;
  return html`
    <h2>Traffic <span class="muted">(${windowText(h)})</span></h2>
    ${h.timestamps.length === 0 ? html`<${NoSamples} h=${h} />` : html`
      <div class="toolbar"><label class="inline"><span>Show</span>
        <select id="history-route" value=${chosen} onChange=${(e) => setChosen(e.target.value)}>
          <option value="">All routes</option>
          ${routes.map((id) => html`<option value=${id}>${id === "none" ? "none (no route matched)" : id}</option>`)}
        </select></label></div>
      <${Charts} xs=${h.timestamps} charts=${routeCharts(h, shown)} />`}
    <table id="traffic">
      <tr><th>Route</th><th>Requests/s</th><th>Error rate (5xx)</th><th>Latest p99</th></tr>
      ${routes.map((id) => {
        const s = h.routes[id];
        const total = sum(s.requests);
        const p99 = lastOf(s.p99_ms);
        return html`<tr data-route=${id} class=${id === chosen ? "chosen" : ""}>
          <td><a href="#/overview" onClick=${(e) => { e.preventDefault(); setChosen(id); }}>${id}</a></td>
          <td>${(total / seconds).toFixed(2)}</td>
          <td>${total ? ((100 * sum(s.status_5xx)) / total).toFixed(1) + "%" : "–"}</td>
          <td>${p99 == null ? "–" : `${p99} ms`}</td></tr>`;
      })}
    </table>`;
}

function Overview() {
  const [status, reload] = useLoad(() => api("GET", "/v1/status"));
  const history = useHistory(reload);
  const [route, setRoute] = useState("");
  return html`<${Loading} state=${status}>${(s) => html`
    <h1>Overview</h1>
    <div class="cards">
      <div class="card"><div class="label">Store</div>
        <div class="value ${s.store.connected ? "ok" : "bad"}" id="store-state">
          ${s.store.store} ${s.store.connected ? "connected" : "disconnected"}</div>
        ${s.store.revision != null && html`<div class="label">revision ${s.store.revision}</div>`}
        ${s.store.reason && html`<div class="label bad">${s.store.reason}</div>`}</div>
      <div class="card"><div class="label">Config generation</div><div class="value">${s.generation}</div></div>
      <div class="card"><div class="label">Routes</div><div class="value">${s.routes.length}</div></div>
      <div class="card"><div class="label">Rejected objects</div>
        <div class="value ${s.errors.length ? "bad" : "ok"}">${s.errors.length}</div></div>
    </div>
    <${Loading} state=${history}>${(h) => html`<${Traffic} h=${h} route=${route} onPick=${setRoute} />`}<//>
    <h2>Rejected objects</h2>
    ${s.errors.length === 0
      ? html`<p class="muted">None: every object in the store is serving.</p>`
      : html`<table id="rejected"><tr><th>Kind</th><th>Id</th><th>Reason</th></tr>
          ${s.errors.map((e) => html`<tr><td>${e.kind}</td><td>${e.id}</td><td>${e.reason}</td></tr>`)}</table>`}
  `}<//>`;
}

// ---- Routes --------------------------------------------------------------------------------

function Routes() {
  const [routes, reload] = useLoad(() => api("GET", "/v1/routes?page_size=500"));
  const [filter, setFilter] = useState("");
  const [error, setError] = useState(null);
  async function toggle(route) {
    const disabled = route.value.status === "disabled";
    try {
      await api("PATCH", `/v1/routes/${route.id}`, { status: disabled ? null : "disabled" });
      reload();
    } catch (e) { setError(e); }
  }
  return html`<h1>Routes</h1>
    <div class="toolbar">
      <input id="route-filter" placeholder="Filter by id, path or upstream" value=${filter}
        onInput=${(e) => setFilter(e.target.value)} />
      <a class="button" id="new-route" href="#/routes/new">New route</a>
    </div>
    <${Notice} error=${error} />
    <${Loading} state=${routes}>${(data) => html`
      <table id="routes">
        <tr><th>Enabled</th><th>Id</th><th>Paths</th><th>Hosts</th><th>Goes to</th><th>Plugins</th></tr>
        ${data.list
          .filter((r) => JSON.stringify(r.value).includes(filter) || r.id.includes(filter))
          .map((r) => html`<tr data-route=${r.id}>
            <td><input type="checkbox" class="switch route-status" data-route=${r.id}
              checked=${r.value.status !== "disabled"} onChange=${() => toggle(r)} /></td>
            <td><a href=${`#/routes/${r.id}`}>${r.id}</a></td>
            <td><code>${[r.value.uri, ...(r.value.uris || [])].filter(Boolean).join(" ")}</code></td>
            <td>${(r.value.hosts || []).join(", ") || html`<span class="muted">any</span>`}</td>
            <td>${r.value.upstream_id ? `upstream ${r.value.upstream_id}` : `service ${r.value.service}`}</td>
            <td>${(r.value.plugins || []).map((p) => p.name).join(", ")}</td>
          </tr>`)}
      </table>`}<//>`;
}

function RouteEditor({ id }) {
  const creating = id === "new";
  const [state] = useLoad(async () => ({
    route: creating ? null : await api("GET", `/v1/routes/${id}`),
    upstreams: await api("GET", "/v1/upstreams?page_size=500"),
    plugins: await api("GET", "/v1/plugins?page_size=500"),
  }), [id]);
  return html`<${Loading} state=${state}>${(data) => html`<${RouteForm} creating=${creating} data=${data} />`}<//>`;
}

function routeFromForm(form) {
  const route = {
    id: form.id,
    uri: form.uri || undefined,
    methods: list(form.methods),
    hosts: list(form.hosts),
    plugins: form.plugins.map((p) => {
      let config = {};
      try { config = p.config.trim() ? JSON.parse(p.config) : {}; } catch (_) { config = p.config; }
      return { name: p.name, config };
    }),
  };
  if (form.target === "service") route.service = form.service; else route.upstream_id = form.upstream;
  if (!form.enabled) route.status = "disabled";
  return route;
}

function RouteForm({ creating, data }) {
  const existing = data.route ? data.route.value : {};
  const [form, setForm] = useState({
    id: existing.id || "",
    uri: existing.uri || "",
    methods: (existing.methods || []).join(", "),
    hosts: (existing.hosts || []).join(", "),
    target: existing.service ? "service" : "upstream",
    upstream: existing.upstream_id || (data.upstreams.list[0] && data.upstreams.list[0].id) || "",
    service: existing.service || "",
    enabled: existing.status !== "disabled",
    plugins: (existing.plugins || []).map((p) => ({ name: p.name, config: JSON.stringify(p.config, null, 2), mode: "form" })),
  });
  const [tab, setTab] = useState("form");
  const [json, setJson] = useState("");
  const [errors, setErrors] = useState([]);
  const [error, setError] = useState(null);
  const set = (key) => (e) => setForm({ ...form, [key]: e.target.type === "checkbox" ? e.target.checked : e.target.value });
  const setPlugin = (index) => (changes) => {
    const plugins = form.plugins.slice();
    plugins[index] = { ...plugins[index], ...changes };
    setForm({ ...form, plugins });
  };
  function showJson() {
    setJson(JSON.stringify(routeFromForm(form), null, 2));
    setTab("json");
  }
  async function save(event) {
    event.preventDefault();
    setErrors([]);
    setError(null);
    let route;
    if (tab === "json") {
      try { route = JSON.parse(json); } catch (e) { setError(new Error(`The JSON does not parse: ${e.message}`)); return; }
    } else {
      route = routeFromForm(form);
      const bad = route.plugins.findIndex((p) => typeof p.config === "string");
      if (bad >= 0) { setErrors([{ path: `/plugins/${bad}/config`, message: "not valid JSON" }]); return; }
    }
    const id = route.id || form.id;
    if (!id) { setErrors([{ path: "/id", message: "a route needs an id" }]); return; }
    try {
      await api("PUT", `/v1/routes/${encodeURIComponent(id)}`, route);
      location.hash = "#/routes";
    } catch (e) {
      if (e.body && e.body.errors) setErrors(e.body.errors);
      else setError(e);
    }
  }
  const general = errors.filter((e) => !["/id", "/uri", "/methods", "/hosts", "/upstream_id", "/service"].includes(e.path)
    && !e.path.startsWith("/plugins/"));
  return html`<h1>${creating ? "New route" : `Route ${form.id}`}</h1>
    <div class="tabs">
      <button type="button" id="tab-form" class=${tab === "form" ? "active" : ""} onClick=${() => setTab("form")}>Form</button>
      <button type="button" id="tab-json" class=${tab === "json" ? "active" : ""} onClick=${showJson}>JSON</button>
    </div>
    <${Notice} error=${error} />
    ${general.map((e) => html`<div class="notice error field-error" data-path=${e.path}>${e.path || "route"}: ${e.message}</div>`)}
    <form onSubmit=${save}>
    ${tab === "json"
      ? html`<textarea id="route-json" rows="20" value=${json} onInput=${(e) => setJson(e.target.value)} />`
      : html`
        <${Field} label="Id" path="/id" errors=${errors}>
          <input type="text" id="route-id" value=${form.id} disabled=${!creating} onInput=${set("id")} /><//>
        <${Field} label="Path (/exact, /prefix/*, /users/{id})" path="/uri" errors=${errors}>
          <input type="text" id="route-uri" value=${form.uri} onInput=${set("uri")} /><//>
        <${Field} label="Methods (comma-separated; empty for any)" path="/methods" errors=${errors}>
          <input type="text" id="route-methods" value=${form.methods} onInput=${set("methods")} /><//>
        <${Field} label="Hosts (comma-separated; empty for any)" path="/hosts" errors=${errors}>
          <input type="text" id="route-hosts" value=${form.hosts} onInput=${set("hosts")} /><//>
        <label><span>Goes to</span>
          <select id="route-target" value=${form.target} onChange=${set("target")}>
            <option value="upstream">an upstream</option><option value="service">a discovered service</option>
          </select></label>
        ${form.target === "upstream"
          ? html`<${Field} label="Upstream" path="/upstream_id" errors=${errors}>
              <select id="route-upstream" value=${form.upstream} onChange=${set("upstream")}>
                ${data.upstreams.list.map((u) => html`<option value=${u.id}>${u.id}</option>`)}
              </select><//>`
          : html`<${Field} label="Service (or * for the first path segment)" path="/service" errors=${errors}>
              <input type="text" id="route-service" value=${form.service} onInput=${set("service")} /><//>`}
        <label><span>Enabled</span><input type="checkbox" id="route-enabled" checked=${form.enabled} onChange=${set("enabled")} /></label>
        <h2>Plugins, in order</h2>
        ${form.plugins.map((p, i) => html`<${PluginRow} index=${i} plugin=${p} entries=${data.plugins.list}
          errors=${errors} onChange=${setPlugin(i)}
          onRemove=${() => setForm({ ...form, plugins: form.plugins.filter((_, j) => j !== i) })} />`)}
        <button type="button" id="add-plugin" onClick=${() => setForm({ ...form, plugins: [...form.plugins, { name: "", config: "{}", mode: "form" }] })}>Add a plugin</button>
      `}
      <p><button class="primary" id="save-route" type="submit">Save</button> <a href="#/routes">Cancel</a></p>
    </form>`;
}

// ---- A route's plugin, with a form built from the plugin's own config schema -----------------

// The schema each plugin described itself with (GET /v1/schema/plugins/<name>), or null for a
// plugin that does not describe itself (a 0.1.0 one): asked once per page load.
const schemas = new Map();

function pluginSchema(name) {
  if (!name) return Promise.resolve(null);
  if (!schemas.has(name)) {
    schemas.set(name, api("GET", `/v1/schema/plugins/${encodeURIComponent(name)}`).catch(() => null));
  }
  return schemas.get(name);
}

// Follows `$ref`s into the schema's `$defs` and unwraps an optional value (`anyOf: [X, null]`),
// keeping the outer description.
function resolveSchema(root, node) {
  for (let depth = 0; node && depth < 8; depth++) {
    const description = node.description;
    if (typeof node.$ref === "string" && node.$ref.startsWith("#/$defs/")) {
      const target = (root.$defs || {})[node.$ref.slice(8)] || {};
      node = { ...target, description: description || target.description, default: node.default ?? target.default };
      continue;
    }
    const alternatives = node.anyOf || node.oneOf;
    if (Array.isArray(alternatives) && alternatives.length === 2 && alternatives.some((a) => a.type === "null")) {
      const target = alternatives.find((a) => a.type !== "null");
      node = { ...target, description: description || target.description, default: node.default ?? target.default };
      continue;
    }
    break;
  }
  return node || {};
}

// Which input a property gets: a choice, a yes/no, a number, text, or JSON for anything else.
function inputKind(node) {
  const type = Array.isArray(node.type) ? node.type.find((t) => t !== "null") : node.type;
  if (Array.isArray(node.enum) && node.enum.every((v) => typeof v === "string")) return { kind: "choice", options: node.enum };
  if (Array.isArray(node.oneOf) && node.oneOf.every((o) => typeof o.const === "string")) {
    return { kind: "choice", options: node.oneOf.map((o) => o.const) };
  }
  if (type === "boolean") return { kind: "boolean" };
  if (type === "integer" || type === "number") return { kind: "number" };
  if (type === "string") return { kind: "text" };
  return { kind: "json" };
}

// The errors at `path` or inside it, shown at `path` (an error deep in an object field shows at
// that field, with the rest of its pointer).
function errorsAt(errors, path) {
  return (errors || [])
    .filter((e) => e.path === path || e.path.startsWith(`${path}/`))
    .map((e) => (e.path === path ? e : { path, message: `${e.path.slice(path.length)}: ${e.message}` }));
}

function PluginRow({ index, plugin, entries, errors, onChange, onRemove }) {
  const [state] = useLoad(() => pluginSchema(plugin.name), [plugin.name]);
  const schema = state.data && state.data.properties ? state.data : null;
  let value;
  try { value = JSON.parse(plugin.config.trim() || "{}"); } catch (_) { value = undefined; }
  const isObject = value && typeof value === "object" && !Array.isArray(value);
  const mode = schema && isObject && plugin.mode !== "json" ? "form" : "json";
  const configPath = `/plugins/${index}/config`;
  return html`<div class="plugin-row" data-plugin=${plugin.name}>
    <${Field} label="Plugin" path=${`/plugins/${index}/name`} errors=${errors}>
      <select id=${`plugin-name-${index}`} value=${plugin.name} onChange=${(e) => onChange({ name: e.target.value })}>
        <option value="">choose…</option>
        ${entries.map((e) => html`<option value=${e.id}>${e.id}</option>`)}
      </select><//>
    ${schema && html`<div class="tabs small">
      <button type="button" id=${`plugin-${index}-mode-form`} class=${mode === "form" ? "active" : ""}
        disabled=${!isObject} onClick=${() => onChange({ mode: "form" })}>Form</button>
      <button type="button" id=${`plugin-${index}-mode-json`} class=${mode === "json" ? "active" : ""}
        onClick=${() => onChange({ mode: "json" })}>JSON</button>
    </div>`}
    ${mode === "form"
      ? html`<${SchemaForm} key=${plugin.name} index=${index} schema=${schema} value=${value} errors=${errors}
          onValue=${(next) => onChange({ config: JSON.stringify(next, null, 2) })} />
        <${FieldErrors} errors=${errors} path=${configPath} />`
      : html`<${Field} label="Config (JSON)" path=${configPath} errors=${errorsAt(errors, configPath)}>
          <textarea id=${`plugin-config-${index}`} rows="4" value=${plugin.config}
            onInput=${(e) => onChange({ config: e.target.value })} /><//>`}
    <button type="button" class="danger" onClick=${onRemove}>Remove</button>
  </div>`;
}

// One input per top-level property of a plugin's config schema. A field left empty is left out
// of the config, so the plugin's default applies.
function SchemaForm({ index, schema, value, errors, onValue }) {
  const required = new Set(schema.required || []);
  const update = (key, next) => {
    const config = { ...value };
    if (next === undefined) delete config[key]; else config[key] = next;
    onValue(config);
  };
  return html`<div class="plugin-form">${Object.entries(schema.properties).map(([key, raw]) => {
    const node = resolveSchema(schema, raw);
    const id = `plugin-${index}-field-${key}`;
    const path = `/plugins/${index}/config/${key}`;
    const hint = node.default !== undefined && node.default !== null ? `default ${JSON.stringify(node.default)}` : "";
    const label = html`<code>${key}</code>${required.has(key) ? " (required)" : ""}${node.description ? ` — ${node.description}` : ""}`;
    return html`<${Field} label=${label} path=${path} errors=${errorsAt(errors, path)}>
      <${SchemaInput} id=${id} node=${node} hint=${hint} current=${value[key]} onValue=${(next) => update(key, next)} /><//>`;
  })}</div>`;
}

function SchemaInput({ id, node, hint, current, onValue }) {
  const kind = inputKind(node);
  const [text, setText] = useState(current === undefined ? "" : JSON.stringify(current, null, 2));
  const [bad, setBad] = useState(false);
  switch (kind.kind) {
    case "choice":
      return html`<select id=${id} value=${current === undefined ? "" : current}
        onChange=${(e) => onValue(e.target.value === "" ? undefined : e.target.value)}>
        <option value="">${hint || "not set"}</option>
        ${kind.options.map((o) => html`<option value=${o}>${o}</option>`)}
      </select>`;
    case "boolean":
      return html`<select id=${id} value=${current === undefined ? "" : String(current)}
        onChange=${(e) => onValue(e.target.value === "" ? undefined : e.target.value === "true")}>
        <option value="">${hint || "not set"}</option><option value="true">yes</option><option value="false">no</option>
      </select>`;
    case "number":
      return html`<input type="number" id=${id} placeholder=${hint} value=${current === undefined ? "" : current}
        onInput=${(e) => onValue(e.target.value === "" ? undefined : Number(e.target.value))} />`;
    case "text":
      return html`<input type="text" id=${id} placeholder=${hint} value=${current === undefined ? "" : current}
        onInput=${(e) => onValue(e.target.value === "" ? undefined : e.target.value)} />`;
    default:
      // Objects and lists are typed as JSON; the config changes once the text parses.
      return html`<textarea id=${id} rows="3" placeholder=${hint} value=${text} class=${bad ? "unparsed" : ""}
        onInput=${(e) => {
          setText(e.target.value);
          if (!e.target.value.trim()) { setBad(false); onValue(undefined); return; }
          try { onValue(JSON.parse(e.target.value)); setBad(false); } catch (_) { setBad(true); }
        }} />${bad ? html`<div class="field-error">not JSON yet</div>` : null}`;
  }
}

// ---- Any object as JSON ---------------------------------------------------------------------

const KINDS = { upstreams: "upstream", plugins: "plugin entry", tenants: "tenant", ssl: "certificate" };
// Where each kind's list lives, to go back to after a save.
const LIST_OF = { upstreams: "upstreams", plugins: "plugins", tenants: "tenants", ssl: "certificates" };

// Edits one object of `kind` as JSON; saves with If-Match, so a change made meanwhile by
// someone else is refused (412) rather than overwritten.
function JsonEditor({ kind, id }) {
  const creating = id === "new";
  const [state] = useLoad(async () => (creating ? null : api("GET", `/v1/${kind}/${id}`)), [kind, id]);
  return html`<${Loading} state=${state}>${(object) => html`<${JsonForm} kind=${kind} creating=${creating} object=${object} />`}<//>`;
}

function JsonForm({ kind, creating, object }) {
  const shown = { ...(object ? object.value : {}) };
  for (const field of ["create_time", "update_time", "id", "name"]) delete shown[field];
  // A stored private key is never shown; leaving `key` out keeps it (the save is a PATCH).
  const keepsKey = kind === "ssl" && !creating;
  if (keepsKey) delete shown.key;
  const [name, setName] = useState(object ? object.id : "");
  const [text, setText] = useState(JSON.stringify(shown, null, 2));
  const [errors, setErrors] = useState([]);
  const [error, setError] = useState(null);
  async function save(event) {
    event.preventDefault();
    setErrors([]);
    setError(null);
    let value;
    try { value = JSON.parse(text); } catch (e) { setErrors([{ path: "", message: `the JSON does not parse: ${e.message}` }]); return; }
    if (!name) { setErrors([{ path: "/id", message: "it needs a name" }]); return; }
    const headers = object && object.revision ? { "If-Match": `"${object.revision}"` } : { "If-None-Match": "*" };
    try {
      const response = await fetch(`/v1/${kind}/${encodeURIComponent(name)}`, {
        method: keepsKey ? "PATCH" : "PUT", credentials: "same-origin", body: JSON.stringify(value),
        headers: { ...headers, "Content-Type": "application/json", "X-CSRF-Token": session.csrf },
      });
      const answer = await response.json().catch(() => ({}));
      if (response.status === 412) throw new Error(creating ? "it exists already" : "someone changed it since you opened it: reload to see their version");
      if (!response.ok) { if (answer.errors) setErrors(answer.errors); else throw new ApiError(response.status, answer); return; }
      location.hash = `#/${LIST_OF[kind]}`;
    } catch (e) { setError(e); }
  }
  return html`<h1>${creating ? `New ${KINDS[kind]}` : `${KINDS[kind]} ${name}`}</h1>
    <${Notice} error=${error} />
    <form onSubmit=${save}>
      <${Field} label="Name" path="/id" errors=${errors}>
        <input type="text" id="object-name" value=${name} disabled=${!creating} onInput=${(e) => setName(e.target.value)} /><//>
      <${Field} label="JSON (the README's config reference has every field)" path="" errors=${errors}>
        <textarea id="object-json" rows="18" value=${text} onInput=${(e) => setText(e.target.value)} /><//>
      ${errors.filter((e) => e.path && e.path !== "/id").map((e) => html`<div class="field-error" data-path=${e.path}><code>${e.path}</code>: ${e.message}</div>`)}
      <p><button class="primary" id="save-object" type="submit">Save</button></p>
    </form>`;
}

// ---- Upstreams and services ----------------------------------------------------------------

function Upstreams() {
  const [state, reload] = useLoad(async () => ({
    upstreams: await api("GET", "/v1/upstreams?page_size=500"),
    services: await api("GET", "/v1/services"),
  }));
  const [error, setError] = useState(null);
  async function toggleNode(upstream, index) {
    const nodes = upstream.value.nodes.map((n, i) =>
      i === index ? { ...n, status: n.status === "offline" ? undefined : "offline" } : n);
    try {
      await api("PATCH", `/v1/upstreams/${upstream.id}`, { nodes });
      reload();
    } catch (e) { setError(e); }
  }
  async function toggleServiceNode(service, node) {
    try {
      await api("PATCH", `/v1/services/${service}/${node.id}`, { status: node.value.status === "offline" ? null : "offline" });
      reload();
    } catch (e) { setError(e); }
  }
  const nodeRow = (node, online, onToggle, attrs) => html`<tr>
    <td><input type="checkbox" class="switch node-status" ...${attrs} checked=${online} onChange=${onToggle} /></td>
    <td><code>${node.host}:${node.port}</code></td><td>${node.weight ?? 1}</td>
    <td class="muted">no health checks configured</td></tr>`;
  return html`<h1>Upstreams and services</h1><${Notice} error=${error} />
    <div class="toolbar"><a class="button" id="new-upstream" href="#/edit/upstreams/new">New upstream</a></div>
    <${Loading} state=${state}>${(data) => html`
      ${data.upstreams.list.map((u) => html`<h2>Upstream ${u.id} <span class="muted">${u.value.type || "roundrobin"}</span>
        <a class="button" href=${`#/edit/upstreams/${u.id}`}>Edit</a></h2>
        <table data-upstream=${u.id}><tr><th>Online</th><th>Node</th><th>Weight</th><th>Health</th></tr>
          ${u.value.nodes.map((n, i) => nodeRow(n, n.status !== "offline", () => toggleNode(u, i),
            { "data-upstream": u.id, "data-node": String(i) }))}</table>`)}
      ${data.services.list.map((s) => html`<h2>Service ${s.name} <span class="muted">registered nodes</span></h2>
        <table data-service=${s.name}><tr><th>Online</th><th>Node</th><th>Weight</th><th>Health</th></tr>
          ${s.nodes.map((n) => nodeRow(n.value, n.value.status !== "offline", () => toggleServiceNode(s.name, n),
            { "data-service": s.name, "data-node": n.id }))}</table>`)}
      ${!data.upstreams.list.length && !data.services.list.length && html`<p class="muted">No upstreams or services yet.</p>`}
    `}<//>`;
}

// ---- Plugins -------------------------------------------------------------------------------

function pluginCharts(h, s) {
  return [
    { id: "chart-plugin-calls", title: "Calls per second", unit: "/s",
      series: [{ label: "calls/s", values: s.calls.map((n, i) => n / (h.seconds[i] || h.interval_s)) }] },
    { id: "chart-plugin-time", title: "Time per call", unit: "µs",
      series: [{ label: "p50", values: s.p50_us }, { label: "p99", values: s.p99_us }, { label: "mean", values: s.mean_us }] },
    { id: "chart-plugin-failures", title: "Failures per sample (traps, timeouts, limits)", unit: "",
      series: [{ label: "failures", values: s.failures }] },
  ];
}

// Each plugin's calls over the gateway's window, summed over the routes it runs on.
function PluginHistory({ h }) {
  const plugins = busiest(h.plugins, "calls");
  const [chosen, setChosen] = useState("");
  const plugin = h.plugins[chosen] ? chosen : plugins[0];
  return html`<h2>Calls over time <span class="muted">(${windowText(h)})</span></h2>
    ${plugins.length === 0 ? html`<p class="muted" id="no-plugin-samples">No plugin calls in the window.</p>` : html`
      <div class="toolbar"><label class="inline"><span>Plugin</span>
        <select id="history-plugin" value=${plugin} onChange=${(e) => setChosen(e.target.value)}>
          ${plugins.map((id) => html`<option value=${id}>${id}</option>`)}
        </select></label></div>
      <${Charts} xs=${h.timestamps} charts=${pluginCharts(h, h.plugins[plugin])} />`}`;
}

function Plugins() {
  const [state, reload] = useLoad(async () => ({
    plugins: await api("GET", "/v1/plugins?page_size=500"),
    modules: await api("GET", "/v1/modules"),
    routes: await api("GET", "/v1/routes?page_size=500"),
    status: await api("GET", "/v1/status"),
    metrics: await metrics(),
  }));
  const history = useHistory();
  const [error, setError] = useState(null);
  const [uploaded, setUploaded] = useState(null);
  const file = useRef(null);
  async function upload(event) {
    event.preventDefault();
    const chosen = file.current.files[0];
    if (!chosen) return;
    try {
      setUploaded(await api("POST", "/v1/modules", undefined, chosen));
      reload();
    } catch (e) { setError(e); }
  }
  const total = (samples, name, plugin) => samples
    .filter((s) => s.name === name && s.labels.plugin === plugin)
    .reduce((all, s) => all + s.value, 0);
  return html`<h1>Plugins</h1><${Notice} error=${error} />
    <div class="toolbar"><a class="button" id="new-plugin" href="#/edit/plugins/new">New plugin entry</a></div>
    <${Loading} state=${state}>${(data) => html`
      <table id="plugins"><tr><th>Plugin</th><th>Kind</th><th>Module</th><th>Tenant</th><th>Grants</th><th>Quarantine</th>
        <th>Calls</th><th>Traps</th><th>Mean µs</th><th>Routes</th></tr>
        ${data.plugins.list.map((p) => {
          const calls = total(data.metrics, "weir_plugin_calls_total", p.id);
          const seconds = total(data.metrics, "weir_plugin_call_duration_seconds_sum", p.id);
          const count = total(data.metrics, "weir_plugin_call_duration_seconds_count", p.id);
          const traps = total(data.metrics, "weir_plugin_failures_total", p.id);
          const quarantined = data.status.quarantined.find((q) => q.plugin === p.id);
          const users = data.routes.list.filter((r) => (r.value.plugins || []).some((x) => x.name === p.id));
          const loaded = data.status.plugins.find((l) => l.name === p.id);
          const kind = loaded ? `${loaded.kind} ${loaded.world}` : "not loaded";
          return html`<tr data-plugin=${p.id}><td><a href=${`#/edit/plugins/${p.id}`}>${p.id}</a></td>
            <td class="kind">${kind}</td>
            <td><code>${(p.value.sha256 || p.value.module || "").slice(0, 12)}</code></td>
            <td>${p.value.tenant || html`<span class="muted">none</span>`}</td>
            <td>${Object.keys(p.value.grants || {}).join(", ") || html`<span class="muted">none</span>`}</td>
            <td>${quarantined ? html`<span class="bad">retry in ${Math.ceil(quarantined.retry_in_ms / 1000)} s</span>` : html`<span class="ok">no</span>`}</td>
            <td>${calls}</td><td>${traps}</td><td>${count ? ((seconds / count) * 1e6).toFixed(0) : "–"}</td>
            <td>${users.map((r) => html`<a href=${`#/routes/${r.id}`}>${r.id}</a> `)}</td></tr>`;
        })}
      </table>
      <${Loading} state=${history}>${(h) => html`<${PluginHistory} h=${h} />`}<//>
      <h2>Modules</h2>
      <table id="modules"><tr><th>sha256</th><th>Size</th><th>Plugin entries</th></tr>
        ${data.modules.list.map((m) => html`<tr><td><code>${m.sha256}</code></td>
          <td>${m.size != null ? `${(m.size / 1024).toFixed(0)} KiB` : "–"}</td><td>${(m.plugins || []).join(", ")}</td></tr>`)}
      </table>
      <h2>Upload a module</h2>
      <form onSubmit=${upload} class="toolbar">
        <input type="file" id="module-file" accept=".wasm" ref=${file} />
        <button class="primary" id="upload-module" type="submit">Upload</button>
      </form>
      ${uploaded && html`<div class="notice" id="uploaded">Stored: sha256 <code>${uploaded.sha256}</code>.
        Point a plugin entry at it: <code>PUT /v1/plugins/NAME {"sha256": "${uploaded.sha256}"}</code></div>`}
    `}<//>`;
}

// ---- Tenants -------------------------------------------------------------------------------

function Tenants() {
  const [state] = useLoad(() => api("GET", "/v1/status"));
  const mib = (bytes) => `${(bytes / (1 << 20)).toFixed(1)} MiB`;
  return html`<h1>Tenants</h1>
    <div class="toolbar"><a class="button" id="new-tenant" href="#/edit/tenants/new">New tenant</a></div>
    <${Loading} state=${state}>${(s) => s.tenants.length === 0
      ? html`<p class="muted">No tenants: plugins run without quotas.</p>`
      : html`<table id="tenants"><tr><th>Tenant</th><th>Memory</th><th>Instances</th><th>KV entries</th><th>KV bytes</th></tr>
        ${s.tenants.map((t) => html`<tr data-tenant=${t.name}><td>${t.name === "default" ? t.name : html`<a href=${`#/edit/tenants/${t.name}`}>${t.name}</a>`}</td>
          <td>${mib(t.usage.memory_bytes)} of ${t.quotas ? `${t.quotas.memory_mb} MiB` : "–"}</td>
          <td>${t.usage.instances} of ${t.quotas ? t.quotas.instances : "–"}</td>
          <td>${t.usage.kv_entries} of ${t.quotas ? t.quotas.kv_entries : "–"}</td>
          <td>${t.usage.kv_bytes} of ${t.quotas ? t.quotas.kv_bytes : "–"}</td></tr>`)}
      </table>`}<//>`;
}

// ---- Certificates --------------------------------------------------------------------------

function Certificates() {
  // Names from the store (a save shows at once); expiry from what is serving.
  const [state] = useLoad(async () => ({
    stored: await api("GET", "/v1/ssl?page_size=500"),
    status: await api("GET", "/v1/status"),
  }));
  const days = (seconds) => Math.floor(seconds / 86400);
  return html`<h1>Certificates</h1>
    <p class="muted">Served on the TLS listener, chosen by the client's SNI. Keys are never shown.</p>
    <div class="toolbar"><a class="button" id="new-certificate" href="#/edit/ssl/new">New certificate</a></div>
    <${Loading} state=${state}>${(s) => s.stored.list.length === 0
      ? html`<p class="muted">No certificates.</p>`
      : html`<table id="certificates"><tr><th>Certificate</th><th>Names</th><th>Expires in</th></tr>
        ${s.stored.list.map((c) => {
          const serving = s.status.certificates.find((x) => x.id === c.id);
          const rejected = s.status.errors.find((e) => e.kind === "ssl" && e.id === c.id);
          return html`<tr data-certificate=${c.id}>
            <td><a href=${`#/edit/ssl/${c.id}`}>${c.id}</a></td>
            <td>${(c.value.snis || []).join(", ")}${c.value.default ? " (default)" : ""}</td>
            <td class=${!serving || days(serving.expires_in_seconds) < 14 ? "bad" : ""}>${serving
              ? `${days(serving.expires_in_seconds)} days` : rejected ? `not served: ${rejected.reason}` : "not served yet"}</td></tr>`;
        })}
      </table>`}<//>`;
}

// ---- The shell -----------------------------------------------------------------------------

const PAGES = [
  ["overview", "Overview"],
  ["routes", "Routes"],
  ["upstreams", "Upstreams"],
  ["plugins", "Plugins"],
  ["tenants", "Tenants"],
  ["certificates", "Certificates"],
];

function App() {
  const [, setTick] = useState(0);
  const [checked, setChecked] = useState(false);
  const [hash, setHash] = useState(location.hash);
  rerender = () => setTick((t) => t + 1);
  useEffect(() => {
    const onHash = () => setHash(location.hash);
    addEventListener("hashchange", onHash);
    api("GET", "/v1/session").then(
      (s) => { Object.assign(session, { csrf: s.csrf_token, username: s.username, role: s.role }); setChecked(true); },
      () => setChecked(true),
    );
    return () => removeEventListener("hashchange", onHash);
  }, []);
  if (!checked) return html`<p class="loading">Loading…</p>`;
  if (!session.csrf) return html`<${Login} onIn=${rerender} />`;
  const [page, id] = hash.replace(/^#\/?/, "").split("/");
  const [, kind, objectId] = hash.replace(/^#\/?/, "").split("/");
  const editing = page === "edit" && KINDS[kind] && objectId;
  const current = editing ? LIST_OF[kind] : PAGES.some(([p]) => p === page) ? page : "overview";
  async function logout() {
    try { await api("POST", "/v1/logout"); } catch (_) { /* the session is gone either way */ }
    session.csrf = null;
    location.hash = "";
    rerender();
  }
  let body;
  if (editing) body = html`<${JsonEditor} kind=${kind} id=${decodeURIComponent(objectId)} />`;
  else if (current === "routes" && id) body = html`<${RouteEditor} id=${decodeURIComponent(id)} />`;
  else if (current === "routes") body = html`<${Routes} />`;
  else if (current === "upstreams") body = html`<${Upstreams} />`;
  else if (current === "plugins") body = html`<${Plugins} />`;
  else if (current === "tenants") body = html`<${Tenants} />`;
  else if (current === "certificates") body = html`<${Certificates} />`;
  else body = html`<${Overview} />`;
  return html`<header><span class="brand">weir</span>
      <nav>${PAGES.map(([p, label]) => html`<a href=${`#/${p}`} id=${`nav-${p}`} class=${p === current ? "active" : ""}>${label}</a>`)}</nav>
      <span class="who">${session.username} (${session.role})</span>
      <button id="logout" onClick=${logout}>Log out</button></header>
    <main>${body}</main>`;
}

render(html`<${App} />`, document.getElementById("app"));
