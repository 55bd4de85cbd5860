// factedit web page: plain JS over the JSON API (no build step).
// Every text that comes from the server is inserted with textContent, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);
const KIND_INFO = {
  hidden: { title: "single restored layer (hidden state)", color: [75, 0, 130], cmap: "purple" },
  mlp: { title: "restored MLP (window of layers)", color: [0, 100, 0], cmap: "green" },
  attn: { title: "restored attention (window of layers)", color: [160, 0, 0], cmap: "red" },
};
let defaults = {};
let methods = [];  // [{name, description, hparams}] from /api/info: the library's registry

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(path, opts);
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (!resp.ok) {
    const detail = data && data.detail ? data.detail : `${resp.status} ${resp.statusText}`;
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return data;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Server values shown on the page: strings as they are, anything else as "–" (never throws).
const str = (v) => (typeof v === "string" ? v : v === null || v === undefined ? "–" : String(v));

// A number input's value, checked against its own min/max (and integer when step is not "any").
function numberInput(sel, name) {
  const input = $(sel);
  const raw = input.value.trim();
  const v = Number(raw);
  const min = input.min === "" ? -Infinity : Number(input.min);
  const max = input.max === "" ? Infinity : Number(input.max);
  const integer = input.step !== "any";
  if (!raw || !Number.isFinite(v) || (integer && !Number.isInteger(v)) || v < min || v > max) {
    const range = `${Number.isFinite(min) ? min : ""}–${Number.isFinite(max) ? max : ""}`;
    throw new Error(`${name}: enter ${integer ? "a whole number" : "a number"}${range === "–" ? "" : " in " + range}`);
  }
  return v;
}

function setStatus(node, text, kind = "") {
  node.textContent = text;
  node.className = "status" + (kind ? " " + kind : "");
}

async function cancelJob(id) {
  try { await api("POST", `/api/jobs/${id}/cancel`); } catch (e) { setStatus($("#patch-status"), e.message, "error"); }
  refreshJobs();
}

// Poll a queued job until it finishes, mirroring its progress into a <progress> and a status line;
// cancelBtn (optional) is shown while the job can still be cancelled.
async function waitJob(job, progressEl, statusEl, cancelBtn) {
  progressEl.hidden = false;
  progressEl.value = 0;
  if (cancelBtn) cancelBtn.onclick = () => { cancelBtn.disabled = true; cancelJob(job.id); };
  try {
    while (job.status === "queued" || job.status === "running") {
      progressEl.value = job.progress;
      const where = job.status === "queued" ? `queued (${job.queue_position ?? 0} ahead)` : job.message;
      setStatus(statusEl, `${where} — ${Math.round(job.progress * 100)}%`);
      if (cancelBtn) { cancelBtn.hidden = !job.cancellable; cancelBtn.disabled = false; }
      await sleep(400);
      job = await api("GET", `/api/jobs/${job.id}`);
    }
  } finally {
    if (cancelBtn) cancelBtn.hidden = true;
  }
  progressEl.value = job.status === "done" ? 1 : progressEl.value;
  refreshJobs();
  if (job.status === "cancelled") throw new Error("cancelled: nothing was changed");
  if (job.status === "failed") throw new Error(job.error || "job failed");
  return job;
}

function fact() {
  const subject = $("#subject").value;
  return { prompt: $("#prompt").value, subject: subject.trim() ? subject : null, chat: $("#chat").checked };
}

function tokenList(top, target) {
  const wrap = el("span", { class: "toks" });
  top.forEach(([t, p], i) => {
    const cls = "tok" + (i === 0 ? " top1" : "") + (target && t.trim() === target.trim() ? " new" : "");
    wrap.append(el("span", { class: "item" }, el("span", { class: cls, text: t }), el("span", { class: "p", text: p.toFixed(3) })));
  });
  return wrap;
}

// ---------------------------------------------------------------- model and info
async function refreshInfo() {
  const info = await api("GET", "/api/info");
  defaults = info.edit_defaults || {};
  methods = Array.isArray(info.method_details) ? info.method_details : [];
  fillMethods();
  $("#model-info").textContent = `${info.model_type}, ${info.num_layers} layers, ${(info.parameters / 1e6).toFixed(0)}M parameters` +
    (info.edited ? " — edited" : "") + ` · weights ${info.fingerprint.slice(0, 10)}`;
  showDefaults();
  return info;
}

// The method menu lists the server's methods (the library's registry); the selection survives a refresh.
function fillMethods() {
  const sel = $("#method");
  const current = sel.value || "rome";
  sel.replaceChildren();
  for (const m of methods) {
    if (typeof m.name !== "string") continue;
    const opt = el("option", { value: m.name, text: `${m.name} — ${str(m.description)}` });
    if (m.name === current) opt.selected = true;
    sel.append(opt);
  }
}

// Only the hyper-parameters the chosen method has are shown; their defaults are the placeholders.
function showDefaults() {
  const method = methods.find((m) => m.name === $("#method").value);
  const settable = method && Array.isArray(method.hparams) ? method.hparams : [];
  const d = defaults[$("#method").value] || {};
  document.querySelectorAll("[data-hp]").forEach((input) => {
    const v = d[input.dataset.hp];
    input.placeholder = v === undefined || v === null ? "" : Array.isArray(v) ? v.join(",") : String(v);
    input.closest("label").hidden = !settable.includes(input.dataset.hp);
  });
}

async function refreshModels() {
  const data = await api("GET", "/api/models");
  const sel = $("#model-select");
  sel.replaceChildren();
  for (const m of data.models) {
    const opt = el("option", { value: m.name, text: m.name + (m.installed ? "" : " (not installed)") });
    if (!m.installed) opt.disabled = true;
    if (m.name === data.loaded) opt.selected = true;
    sel.append(opt);
  }
}

async function loadModel() {
  const status = $("#predict-status");
  try {
    const resp = await fetch("/api/model", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: $("#model-select").value }) });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.detail);
    if (data.job) await waitJob(data.job, $("#trace-progress"), status);
    setStatus(status, `model: ${$("#model-select").value}`, "ok");
    await Promise.all([refreshInfo(), refreshPatches(), refreshModels()]);
  } catch (e) { setStatus(status, e.message, "error"); }
}

// ---------------------------------------------------------------- predictions
async function predict() {
  const status = $("#predict-status");
  try {
    const data = await api("POST", "/api/predict", { ...fact(), k: 5 });
    const body = $("#predictions tbody");
    body.replaceChildren();
    const row = el("tr", {}, el("td", { class: "muted", text: data.edited ? "edited model" : "original model" }),
      el("td", {}, tokenList(data.top)));
    row.dataset.top1 = data.top[0][0];
    body.append(row);
    setStatus(status, "");
  } catch (e) { setStatus(status, e.message, "error"); }
}

// ---------------------------------------------------------------- tracing
async function trace() {
  const status = $("#trace-status");
  const btn = $("#trace-btn");
  btn.disabled = true;
  try {
    const body = { ...fact(), samples: numberInput("#trace-samples", "noise samples"),
      window: numberInput("#trace-window", "window") };
    if ($("#trace-answer").value.trim()) body.answer = $("#trace-answer").value;
    const { job } = await api("POST", "/api/trace", body);
    const done = await waitJob(job, $("#trace-progress"), status, $("#trace-cancel"));
    renderTrace(done.result);
    setStatus(status, `done in ${done.result.meta.seconds.toFixed(1)} s (${done.result.meta.restorations} restorations)`, "ok");
  } catch (e) { setStatus(status, e.message, "error"); }
  finally { btn.disabled = false; }
}

function renderTrace(r) {
  $("#trace-summary").textContent = `answer ${JSON.stringify(r.answer)}: clean p = ${r.clean_prob.toFixed(4)}, ` +
    `corrupted p = ${r.low_prob.toFixed(4)} (noise ${r.noise.toFixed(3)}, ${r.samples} samples)` +
    (r.answer_is_prediction ? "" : ` — the model predicts ${JSON.stringify(r.predicted)}`);
  for (const kind of ["hidden", "mlp", "attn"]) {
    const fig = $(`#heatmap-${kind}`);
    fig.replaceChildren();
    if (r.scores[kind]) fig.append(heatmap(r, kind), el("figcaption", { text: `Impact of ${KIND_INFO[kind].title}; p(${r.answer.trim()})` }));
  }
}

function mix(color, t) {
  // white (t = 0) to the kind's colour (t = 1), as the paper's Purples / Greens / Reds maps
  return `rgb(${color.map((c) => Math.round(255 + (c - 255) * t)).join(",")})`;
}

function heatmap(r, kind) {
  const m = r.scores[kind];
  const T = m.length, L = m[0].length;
  const labels = r.tokens.map((tok, t) => JSON.stringify(tok).slice(1, -1) + (t >= r.subject_range[0] && t < r.subject_range[1] ? "*" : ""));
  const longest = Math.max(...labels.map((s) => s.length));
  const cw = Math.max(6, Math.min(16, Math.floor(330 / L))), ch = 18, top = 8, bottom = 58;
  const left = Math.min(200, Math.max(48, longest * 7 + 14));
  const width = left + L * cw + 16, height = top + T * ch + bottom;
  const values = m.flat().filter((v) => v !== null);
  const lo = r.low_prob, hi = Math.max(lo + 1e-9, ...values);
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "data-kind": kind, role: "img",
    "aria-label": `${kind} causal-trace heatmap` });
  const color = KIND_INFO[kind].color;
  for (let t = 0; t < T; t++) {
    const label = svgEl("text", { x: left - 6, y: top + t * ch + ch * 0.7, "text-anchor": "end" });
    label.textContent = labels[t];
    svg.append(label);
    for (let l = 0; l < L; l++) {
      const v = m[t][l];
      const frac = v === null ? 0 : Math.min(1, Math.max(0, (v - lo) / (hi - lo)));
      const cell = svgEl("rect", { class: "cell", x: left + l * cw, y: top + t * ch, width: cw, height: ch,
        fill: v === null ? "#ddd" : mix(color, frac) });
      cell.dataset.token = r.tokens[t];
      cell.dataset.t = t;
      cell.dataset.layer = l;
      cell.dataset.p = v === null ? "" : v.toFixed(4);
      svg.append(cell);
    }
  }
  for (let l = 0; l < L; l += 5) {
    const tick = svgEl("text", { x: left + l * cw + cw / 2, y: top + T * ch + 14, "text-anchor": "middle" });
    tick.textContent = String(l);
    svg.append(tick);
  }
  const axis = svgEl("text", { x: left + (L * cw) / 2, y: top + T * ch + 30, "text-anchor": "middle" });
  axis.textContent = kind === "hidden" ? "layer" : `centre of ${r.window} restored layers`;
  svg.append(axis);
  // colour bar: corrupted probability (white) to the maximum (full colour)
  const barW = Math.min(200, L * cw), barX = left, barY = top + T * ch + 38;
  const grad = svgEl("linearGradient", { id: `grad-${kind}` });
  grad.append(svgEl("stop", { offset: "0", "stop-color": mix(color, 0) }), svgEl("stop", { offset: "1", "stop-color": mix(color, 1) }));
  const defs = svgEl("defs");
  defs.append(grad);
  svg.append(defs, svgEl("rect", { x: barX, y: barY, width: barW, height: 8, fill: `url(#grad-${kind})`, stroke: "#999", "stroke-width": 0.5 }));
  const loT = svgEl("text", { x: barX - 4, y: barY + 8, "text-anchor": "end" });
  loT.textContent = lo.toFixed(3);
  const hiT = svgEl("text", { x: barX + barW + 4, y: barY + 8 });
  hiT.textContent = hi.toFixed(3);
  svg.append(loT, hiT);
  svg.addEventListener("mousemove", hover);
  svg.addEventListener("mouseleave", () => { $("#tooltip").hidden = true; });
  return svg;
}

function hover(ev) {
  const tip = $("#tooltip");
  const cell = ev.target.closest ? ev.target.closest("rect.cell") : null;
  if (!cell) { tip.hidden = true; return; }
  const kind = cell.ownerSVGElement.dataset.kind;
  tip.textContent = `${kind}\ntoken ${cell.dataset.t}: ${JSON.stringify(cell.dataset.token)}\nlayer ${cell.dataset.layer}\n` +
    `p = ${cell.dataset.p || "n/a"}`;
  tip.hidden = false;
  tip.style.left = `${ev.clientX + 14}px`;
  tip.style.top = `${ev.clientY + 12}px`;
}

// ---------------------------------------------------------------- editing
function lines(text) {
  return text.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
}

function hparams() {
  const out = {};
  document.querySelectorAll("[data-hp]").forEach((input) => {
    const raw = input.value.trim();
    if (!raw || input.closest("label").hidden) return;
    const name = input.dataset.hp;
    if (name === "layers") {
      const layers = raw.split(/[ ,]+/).filter(Boolean).map(Number);
      if (!layers.length || !layers.every((l) => Number.isInteger(l) && l >= 0)) {
        throw new Error("layers: enter layer numbers (whole numbers from 0) separated by commas");
      }
      out[name] = layers;
    } else {
      out[name] = numberInput(`#${input.id}`, name);
    }
  });
  return Object.keys(out).length ? out : null;
}

async function edit() {
  const status = $("#edit-status");
  const btn = $("#edit-btn");
  btn.disabled = true;
  try {
    const f = fact();
    const body = { prompt: f.prompt, subject: f.subject, chat: f.chat, target: $("#target").value, method: $("#method").value,
      paraphrases: lines($("#paraphrases").value), neighbours: lines($("#neighbours").value),
      generate_tokens: numberInput("#generate-tokens", "generate tokens") };
    const hp = hparams();
    if (hp) body.hparams = hp;
    const { job } = await api("POST", "/api/edit", body);
    const done = await waitJob(job, $("#edit-progress"), status, $("#edit-cancel"));
    renderEdit(done.result);
    const layers = Array.isArray(done.result.layers) ? done.result.layers.join(",") : str(done.result.layers);
    const patch = done.result.patch ? `patch ${str(done.result.patch.id)} applied` : "no patch made";
    setStatus(status, `${patch} (${str(done.result.method)}, layer ${layers}, ${done.result.edit_seconds.toFixed(1)} s)`, "ok");
    await Promise.all([refreshPatches(), refreshInfo(), predict()]);
  } catch (e) { setStatus(status, e.message, "error"); }
  finally { btn.disabled = false; }
}

function pfmt(a, b) {
  return a === null || a === undefined ? "–" : `${a.toPrecision(3)} → ${b.toPrecision(3)}`;
}

// One line: did the optimisation converge, and is the new target now the top prediction?
function renderVerdict(r) {
  const node = $("#edit-verdict");
  const mark = (ok) => (ok ? "yes" : "no");
  node.replaceChildren(
    el("span", { class: r.converged ? "good" : "bad", text: `optimisation converged: ${mark(r.converged)}` }), " · ",
    el("span", { class: r.landed ? "good" : "bad", text: `new target ${JSON.stringify(str(r.target_new))} is the top prediction: ${mark(r.landed)}` }));
  node.dataset.landed = r.landed ? "1" : "0";
  node.dataset.converged = r.converged ? "1" : "0";
}

function renderEdit(r) {
  renderVerdict(r);
  const body = $("#edit-results tbody");
  body.replaceChildren();
  for (const row of r.checks) {
    const tr = el("tr", {}, el("td", { text: row.kind }), el("td", { text: row.text }),
      el("td", { class: "before" }, tokenList(row.before.top, r.target_new)),
      el("td", { class: "after" }, tokenList(row.after.top, r.target_new)),
      el("td", { text: pfmt(row.before.p_target_new, row.after.p_target_new) }),
      el("td", { text: pfmt(row.before.p_target_true, row.after.p_target_true) }));
    tr.dataset.kind = row.kind;
    tr.dataset.beforeTop1 = row.before.top[0][0];
    tr.dataset.afterTop1 = row.after.top[0][0];
    body.append(tr);
  }
  const gen = $("#generation");
  gen.replaceChildren();
  if (r.generation.before !== null) {
    gen.append(el("div", { class: "muted", text: "generation before" }),
      el("div", { class: "gen", id: "gen-before", text: r.generation.prompt + r.generation.before }),
      el("div", { class: "muted", text: "generation after" }),
      el("div", { class: "gen", id: "gen-after", text: r.generation.prompt + r.generation.after }));
  }
}

// ---------------------------------------------------------------- patches
async function refreshPatches() {
  const data = await api("GET", "/api/patches");
  const body = $("#patch-list tbody");
  body.replaceChildren();
  const patches = Array.isArray(data.patches) ? data.patches : [];
  patches.forEach((p, i) => {
    const last = i === patches.length - 1;
    const id = /^[0-9a-f]{12}$/.test(p.id) ? p.id : "";
    const revert = el("button", { type: "button", class: "secondary revert-btn", text: "Revert" });
    revert.disabled = !last || !id;
    revert.title = last ? "restore the weights before this patch" : "revert the later patches first";
    revert.addEventListener("click", () => revertPatch(id));
    const download = el("a", { href: `/api/patches/${id}/download`, download: `factedit-patch-${id}.safetensors`,
      class: "download-link", text: "Download" });
    const req = p.request && typeof p.request === "object" ? p.request : {};
    const fact = typeof req.text === "string" && req.text ? `${req.text} → ${str(req.target_new)}`
      : `${str(p.n_requests)} request(s)`;
    const layers = Array.isArray(p.layers) ? p.layers.map(str).join(",") : str(p.layers);
    const tr = el("tr", {}, el("td", { class: "tok", text: str(p.id) }), el("td", { text: str(p.method) }),
      el("td", { text: fact }), el("td", { text: layers }), el("td", { text: str(p.source) }),
      el("td", {}, revert, " ", download));
    tr.dataset.patchId = p.id;
    body.append(tr);
  });
  if (!patches.length) body.append(el("tr", {}, el("td", { class: "muted", colspan: "6", text: "none: the model has its original weights" })));
  const kept = data.persistence && typeof data.persistence === "object" ? data.persistence : {};
  const mib = (n) => (typeof n === "number" ? (n / 1048576).toFixed(1) : "–");
  let text = kept.enabled
    ? `Applied patches are saved in ${str(kept.folder)} and re-applied (verified) when the server restarts.`
    : "Applied patches are kept in memory only: a restart or a crash of the server loses them (download them to keep them).";
  text += ` ${patches.length} of at most ${str(data.max_patches)} applied; ${mib(data.patch_memory)} of ` +
    `${mib(data.max_patch_memory)} MiB of replaced weights kept.`;
  if (kept.problem) text += ` Note: ${str(kept.problem)}`;
  $("#persist-status").textContent = text;
  $("#persist-status").dataset.persist = kept.enabled ? "1" : "0";
}

async function revertPatch(id) {
  const status = $("#patch-status");
  try {
    const { job } = await api("POST", `/api/patches/${id}/revert`);
    await waitJob(job, $("#edit-progress"), status);
    setStatus(status, `patch ${id} reverted`, "ok");
    await Promise.all([refreshPatches(), refreshInfo(), predict()]);
  } catch (e) { setStatus(status, e.message, "error"); }
}

async function uploadPatch() {
  const status = $("#patch-status");
  const file = $("#patch-file").files[0];
  if (!file) { setStatus(status, "choose a patch file first", "error"); return; }
  try {
    const form = new FormData();
    form.append("file", file);
    const { job } = await api("POST", "/api/patches/upload", form);
    const done = await waitJob(job, $("#edit-progress"), status);
    setStatus(status, `patch ${done.result.patch.id} applied`, "ok");
    await Promise.all([refreshPatches(), refreshInfo(), predict()]);
  } catch (e) { setStatus(status, e.message, "error"); }
}

// ---------------------------------------------------------------- jobs
async function refreshJobs() {
  try {
    const data = await api("GET", "/api/jobs");
    const body = $("#job-list tbody");
    body.replaceChildren();
    const recent = data.jobs.slice(-8).reverse();
    for (const j of recent) {
      const cell = el("td", {});
      if (j.cancellable && /^[0-9a-f]{16}$/.test(j.id)) {
        const btn = el("button", { type: "button", class: "secondary cancel-btn", text: "Cancel" });
        btn.addEventListener("click", () => { btn.disabled = true; cancelJob(j.id); });
        cell.append(btn);
      }
      const row = el("tr", {}, el("td", { class: "tok", text: j.id.slice(0, 8) }), el("td", { text: j.kind }),
        el("td", { text: j.status }), el("td", { text: `${Math.round(j.progress * 100)}%` }),
        el("td", { class: j.error && j.status === "failed" ? "status error" : "muted", text: j.error || j.message }), cell);
      row.dataset.jobId = j.id;
      row.dataset.status = j.status;
      body.append(row);
    }
    const active = data.jobs.filter((j) => j.status === "queued" || j.status === "running").length;
    $("#queue-status").textContent = active ? `${active} job(s) in progress` : "idle";
  } catch (e) { /* the next refresh will try again */ }
}

// ---------------------------------------------------------------- start
$("#predict-btn").addEventListener("click", predict);
$("#trace-btn").addEventListener("click", trace);
$("#edit-btn").addEventListener("click", edit);
$("#upload-btn").addEventListener("click", uploadPatch);
$("#model-load").addEventListener("click", loadModel);
$("#method").addEventListener("change", showDefaults);
setInterval(refreshJobs, 3000);
Promise.all([refreshModels(), refreshInfo(), refreshPatches(), refreshJobs()])
  .then(() => { document.body.dataset.ready = "1"; })
  .catch((e) => setStatus($("#predict-status"), e.message, "error"));
