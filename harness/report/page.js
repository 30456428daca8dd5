// report.html's script: sortable tables and the example browser. No libraries, no network.
"use strict";

// Sortable tables: a click on a heading sorts by that column, numbers as numbers ("0.41 [0.3, 0.5]"
// and "2-5 ✓" sort by their first number), again to reverse.
function sortTable(table, column, th) {
  const dir = th.dataset.dir === "asc" ? "desc" : "asc";
  table.querySelectorAll("th").forEach((h) => delete h.dataset.dir);
  th.dataset.dir = dir;
  const body = table.tBodies[0];
  const key = (row) => {
    const text = row.cells[column] ? row.cells[column].textContent.trim() : "";
    const number = parseFloat(text);
    return { text, number };
  };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    let order;
    if (!isNaN(x.number) && !isNaN(y.number)) order = x.number - y.number;
    else if (x.text === "" || y.text === "") order = x.text === "" ? 1 : -1; // blanks last
    else order = x.text.localeCompare(y.text);
    return dir === "asc" ? order : -order;
  });
  rows.forEach((r) => body.appendChild(r));
}

document.querySelectorAll("table.sortable").forEach((table) => {
  table.querySelectorAll("thead th").forEach((th, column) => {
    th.title = "sort by this column";
    th.addEventListener("click", () => sortTable(table, column, th));
  });
});

// The example browser.
const GROUPS = JSON.parse(document.getElementById("examples-data").textContent);
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173"];
const state = { group: 0, predicted: "", status: "", methods: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  });
  children.forEach((c) => node.append(c));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  return node;
}

function select(id, label, options, value, onChange) {
  const box = el("select", { id });
  options.forEach(([v, text]) => {
    const option = el("option", { value: v, text });
    if (v === value) option.selected = true;
    box.append(option);
  });
  box.addEventListener("change", () => onChange(box.value));
  return el("label", {}, label + " ", box);
}

function colour(group, method) {
  return COLOURS[group.methods.indexOf(method) % COLOURS.length];
}

function counts(values) {
  const n = new Map();
  values.forEach((v) => n.set(v, (n.get(v) || 0) + 1));
  return n;
}

function buildControls() {
  const controls = document.getElementById("controls");
  controls.replaceChildren();
  const group = GROUPS[state.group];
  if (GROUPS.length > 1) {
    controls.append(select("filter-group", "Model / data", GROUPS.map((g, i) => [String(i), g.name]),
      String(state.group), (v) => { state.group = Number(v); state.predicted = ""; state.methods = null; buildControls(); render(); }));
  }
  const predicted = counts(group.images.map((im) => im.pred));
  const classes = Array.from(predicted.keys()).sort();
  controls.append(select("filter-class", "Predicted class", [["", `all (${group.images.length})`],
    ...classes.map((c) => [c, `${c} (${predicted.get(c)})`])], state.predicted,
    (v) => { state.predicted = v; render(); }));
  const statuses = counts(group.images.map((im) => im.status));
  controls.append(select("filter-status", "Prediction", [["", "all"],
    ...["correct", "incorrect", "unlabelled"].map((s) => [s, `${s} (${statuses.get(s) || 0})`])],
    state.status, (v) => { state.status = v; render(); }));
  if (state.methods === null) state.methods = new Set(group.methods);
  const legend = document.getElementById("legend");
  legend.replaceChildren(el("span", { text: "Maps of:" }));
  group.methods.forEach((m) => {
    const box = el("input", { type: "checkbox", value: m, class: "method" });
    box.checked = state.methods.has(m);
    box.addEventListener("change", () => { box.checked ? state.methods.add(m) : state.methods.delete(m); render(); });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour(group, m);
    legend.append(el("label", {}, box, swatch, m));
  });
}

function chart(group, image, curve, methods) {
  const W = 200, H = 140, L = 30, R = 8, T = 18, B = 26;
  const x = group.x[curve] || [];
  const lines = methods.filter((m) => (image.curves[curve] || {})[m]);
  const all = lines.flatMap((m) => image.curves[curve][m]).filter((v) => v !== null);
  let lo = Math.min(0, ...all), hi = Math.max(1, ...all);
  if (!(hi > lo)) hi = lo + 1;
  const px = (v) => L + (W - L - R) * v;
  const py = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
  const root = svg("svg", { class: "curve", width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-curve": curve });
  const title = svg("text", { x: L, y: 12 });
  title.textContent = curve;
  root.append(title, svg("line", { x1: L, y1: py(lo), x2: W - R, y2: py(lo), stroke: "#999" }),
    svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#999" }));
  [[lo, py(lo)], [hi, py(hi)]].forEach(([v, y]) => {
    const t = svg("text", { x: 2, y: y + 3 });
    t.textContent = Number(v.toFixed(2)).toString();
    root.append(t);
  });
  const axis = curve.startsWith("model_randomisation") ? "blocks re-initialised" : "fraction changed";
  [["0", px(0) - 3], [axis, px(0.5) - 3 * axis.length], ["1", px(1) - 3]].forEach(([v, x0]) => {
    const t = svg("text", { x: x0, y: H - 10 });
    t.textContent = v;
    root.append(t);
  });
  lines.forEach((m) => {
    const points = image.curves[curve][m]
      .map((v, i) => (v === null || x[i] === undefined ? null : `${px(x[i]).toFixed(1)},${py(v).toFixed(1)}`))
      .filter((p) => p !== null).join(" ");
    const line = svg("polyline", { points, fill: "none", stroke: colour(group, m), "stroke-width": 1.4 });
    const tip = svg("title", {});
    tip.textContent = m;
    line.append(tip);
    root.append(line);
  });
  return root;
}

function card(group, image, methods) {
  const badge = el("span", { class: `badge ${image.status}`, text: image.status });
  const head = el("div", { class: "head" }, el("b", { text: image.id }),
    ` · label: ${image.label === null ? "none" : image.label} · predicted: ${image.pred}`, badge);
  const maps = el("div", { class: "maps" },
    el("figure", {}, el("img", { src: image.src, alt: image.id }), el("figcaption", { text: "image" })));
  methods.forEach((m) => {
    if (image.maps[m]) {
      maps.append(el("figure", {}, el("img", { src: image.maps[m], alt: `${m} on ${image.id}` }),
        el("figcaption", { text: m })));
    }
  });
  const top = el("table", { class: "top" }, el("caption", { text: "Top predictions" }));
  image.top.forEach(([name, p], i) => {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.round(80 * p)}px`;
    top.append(el("tr", {}, el("td", { text: String(i + 1) }), el("td", { text: name }),
      el("td", {}, bar, `${(100 * p).toFixed(1)}%`)));
  });
  const lower = el("div", { class: "lower" }, top);
  Object.keys(group.x).forEach((curve) => {
    if (image.curves[curve]) lower.append(chart(group, image, curve, methods));
  });
  const fields = Object.keys(group.fields);
  if (fields.length) {
    const values = el("table", { class: "values" }, el("caption", { text: "Values on this image" }));
    values.append(el("tr", {}, el("th", { text: "method" }),
      ...fields.map((f) => el("th", { text: `${f} ${group.fields[f] === "higher" ? "↑" : "↓"}` }))));
    methods.forEach((m) => {
      const v = image.values[m] || {};
      values.append(el("tr", {}, el("td", { text: m }),
        ...fields.map((f) => el("td", { text: v[f] === undefined || v[f] === null ? "" : v[f].toFixed(3) }))));
    });
    lower.append(values);
  }
  return el("div", { class: "example", "data-id": image.id, "data-pred": image.pred, "data-status": image.status },
    head, maps, lower);
}

function render() {
  const cards = document.getElementById("cards");
  const shown = document.getElementById("shown");
  cards.replaceChildren();
  if (!GROUPS.length) { shown.textContent = "No examples."; return; }
  const group = GROUPS[state.group];
  const methods = group.methods.filter((m) => state.methods.has(m));
  const images = group.images.filter((im) =>
    (state.predicted === "" || im.pred === state.predicted) && (state.status === "" || im.status === state.status));
  const more = group.total > group.images.length ? ` (the first ${group.images.length} of the sweep's ${group.total})` : "";
  shown.textContent = `${images.length} of ${group.images.length} images${more}.`;
  images.forEach((im) => cards.append(card(group, im, methods)));
}

if (GROUPS.length) buildControls();
render();
