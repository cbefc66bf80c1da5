// sdtorch web page: plain JavaScript on the server's jobs API (/v1/jobs, /v1/events) and the
// AUTOMATIC1111 routes for the lists (/sdapi/v1/samplers, /sdapi/v1/sd-models, /sdapi/v1/options).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TERMINAL = new Set(["completed", "failed", "canceled"]);
  const FIELDS = ["prompt", "negative", "steps", "cfg", "width", "height", "seed", "batch", "sampler", "scheduler", "strength"];
  const state = {
    jobs: new Map(),   // id -> job submitted from this page
    current: null,     // the job the preview panel follows
    previewURL: null,  // object URL shown in #preview
    init: null,        // {dataURL, width, height}: the img2img image
    painted: false,
    gallerySeen: new Set(),
  };

  // ------------------------------------------------------------------ HTTP
  async function api(method, path, body) {
    const opts = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(path, opts);
    const text = await r.text();
    let data = null;
    if (text) { try { data = JSON.parse(text); } catch { data = text; } }
    if (!r.ok) {
      const err = new Error(describeError(r.status, data));
      err.status = r.status;
      err.retryAfter = r.headers.get("Retry-After");
      throw err;
    }
    return data;
  }

  function describeError(status, data) {
    let d = data && typeof data === "object" && !Array.isArray(data) ? (data.detail ?? data.error ?? data) : data;
    if (Array.isArray(d)) {
      d = d.map((e) => (e && e.msg ? `${(e.loc || []).filter((x) => x !== "body").join(".")}: ${e.msg}` : JSON.stringify(e))).join("; ");
    } else if (d && typeof d === "object") d = JSON.stringify(d);
    return `${status}: ${d || "request failed"}`;
  }

  const asList = (r) => (Array.isArray(r) ? r : (r && (r.jobs || r.items || r.data)) || []);
  function parseInfo(info) {
    if (typeof info !== "string") return info || {};
    try { return JSON.parse(info); } catch { return { infotexts: [info] }; }
  }

  let statusTimer = null;
  function setStatus(text, kind = "info") {
    const el = $("status");
    el.textContent = text;
    el.className = `status ${kind}`;
    clearTimeout(statusTimer);
    if (kind !== "error") statusTimer = setTimeout(() => { el.textContent = ""; }, 6000);
  }

  const fmtSeconds = (s) => (s == null || !isFinite(s) ? "" : s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`);
  const el = (tag, attrs = {}, ...children) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (v != null) e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  };

  // ------------------------------------------------------------------ lists
  async function loadSamplers() {
    const list = asList(await api("GET", "/sdapi/v1/samplers"));
    const select = $("sampler");
    const saved = select.dataset.saved;
    select.replaceChildren(...list.map((s) => el("option", { value: s.name }, s.name)));
    const names = list.map((s) => s.name);
    select.value = [saved, "DPM++ 2M", "Euler a"].find((n) => n && names.includes(n)) || names[0] || "";
  }

  async function loadSchedulers() {
    let list;
    try { list = asList(await api("GET", "/sdapi/v1/schedulers")); } catch { return; }
    const select = $("scheduler");
    const saved = select.dataset.saved;
    const opts = list.filter((s) => s && s.name && s.name !== "automatic")
      .map((s) => el("option", { value: s.name }, s.label || s.name));
    select.replaceChildren(el("option", { value: "" }, "Automatic"), ...opts);
    if (saved && [...select.options].some((o) => o.value === saved)) select.value = saved;
  }

  async function loadModels() {
    const [models, options] = await Promise.all([
      api("GET", "/sdapi/v1/sd-models"),
      api("GET", "/sdapi/v1/options").catch(() => ({})),
    ]);
    const select = $("model");
    const list = asList(models);
    select.replaceChildren(...list.map((m) => el("option", { value: m.title, title: m.filename || m.title }, m.model_name || m.title)));
    const cur = options && options.sd_model_checkpoint;
    const match = list.find((m) => m.title === cur || m.model_name === cur);
    if (match) select.value = match.title;
  }

  async function switchModel() {
    const select = $("model");
    const title = select.value;
    select.disabled = true;
    setStatus(`loading ${title} …`);
    try {
      await api("POST", "/sdapi/v1/options", { sd_model_checkpoint: title });
      setStatus(`model: ${title}`, "ok");
    } catch (e) {
      setStatus(`model switch failed: ${e.message}`, "error");
      loadModels().catch(() => {});
    } finally {
      select.disabled = false;
    }
  }

  // ------------------------------------------------------------------ the request
  function num(id, parse) {
    const v = $(id).value.trim();
    if (v === "") return undefined;
    const n = parse(v);
    return Number.isFinite(n) ? n : undefined;
  }

  function buildJob() {
    const request = {
      prompt: $("prompt").value,
      negative_prompt: $("negative").value,
      steps: num("steps", parseInt),
      cfg_scale: num("cfg", parseFloat),
      sampler_name: $("sampler").value || undefined,
      scheduler: $("scheduler").value || undefined,
      width: num("width", parseInt),
      height: num("height", parseInt),
      seed: num("seed", parseInt),
      batch_size: num("batch", parseInt),
    };
    let kind = "txt2img";
    if (state.init) {
      kind = "img2img";
      request.init_images = [state.init.dataURL];
      request.denoising_strength = num("strength", parseFloat);
      if (state.painted && maskHasPaint()) request.mask = maskDataURL();
    }
    for (const k of Object.keys(request)) if (request[k] === undefined) delete request[k];
    return { kind, request };
  }

  async function submit(ev) {
    ev.preventDefault();
    const body = buildJob();
    const button = $("generate");
    button.disabled = true;
    try {
      const r = await api("POST", "/v1/jobs", body);
      const job = { id: r.id, kind: body.kind, request: body.request, state: r.state || "pending", position: r.position,
                    step: 0, steps: body.request.steps, eta: null, previewStep: -1, done: false, started: Date.now() };
      state.jobs.set(job.id, job);
      rememberJobs();
      follow(job);
      setStatus(`queued${r.position != null ? ` at position ${r.position}` : ""}`);
      refreshQueue();
    } catch (e) {
      const retry = e.status === 429 && e.retryAfter ? ` (retry in ${e.retryAfter} s)` : "";
      setStatus(`${e.message}${retry}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------ progress and preview
  function follow(job) {
    state.current = job ? job.id : null;
    renderProgress();
  }

  function nextActive() {
    const active = [...state.jobs.values()].filter((j) => !j.done);
    return active.find((j) => j.state === "running") || active[0] || null;
  }

  function renderProgress() {
    const job = state.jobs.get(state.current);
    const bar = $("progress");
    $("cancel").disabled = !job || job.done;
    if (!job) return;
    const steps = job.steps || 0;
    if (job.state === "pending") {
      bar.value = 0;
      $("progress-label").textContent = `queued${job.position != null ? ` · position ${job.position}` : ""}`;
      $("eta").textContent = "";
    } else if (job.state === "running") {
      bar.value = steps ? Math.min(1, job.step / steps) : 0;
      $("progress-label").textContent = `step ${job.step}/${steps || "?"}`;
      $("eta").textContent = job.eta != null ? `ETA ${fmtSeconds(job.eta)}` : "";
    } else {
      bar.value = job.state === "completed" ? 1 : bar.value;
      const took = ((job.finished || Date.now()) - job.started) / 1000;
      $("progress-label").textContent = job.state === "completed" ? `done in ${fmtSeconds(took)}` : job.state;
      $("eta").textContent = job.error ? String(job.error) : "";
    }
  }

  function showPreview(src, { crisp = false, objectURL = false } = {}) {
    const img = $("preview");
    if (state.previewURL && state.previewURL !== src) URL.revokeObjectURL(state.previewURL);
    state.previewURL = objectURL ? src : null;
    img.src = src;
    img.classList.toggle("crisp", crisp);
    img.hidden = false;
    $("preview-empty").hidden = true;
  }

  async function fetchPreview(job, step) {
    try {
      const r = await fetch(`/v1/jobs/${encodeURIComponent(job.id)}/preview?step=${step}`, { cache: "no-store" });
      if (!r.ok) return;  // 404 before the first preview
      const url = URL.createObjectURL(await r.blob());
      if (state.current === job.id && !job.done) showPreview(url, { objectURL: true });
      else URL.revokeObjectURL(url);
    } catch { /* the next step brings another */ }
  }

  // One update from an event or a poll: {state, step, steps, eta_s, position, preview?}
  function apply(job, d) {
    if (job.done) return;
    const was = job.state;
    if (d.state) job.state = d.state;
    if (d.steps) job.steps = d.steps;
    if (d.step != null) job.step = d.step;
    if (d.eta_s !== undefined) job.eta = d.eta_s;
    if (d.position !== undefined) job.position = d.position;
    if (d.error) job.error = d.error;
    if (job.state === "running" && state.current !== job.id) {
      const cur = state.jobs.get(state.current);
      if (!cur || cur.done || cur.state !== "running") state.current = job.id;
    }
    if (state.current === job.id && job.state === "running" && job.step > job.previewStep) {
      if (typeof d.preview === "string" && d.preview) {
        job.previewStep = job.step;
        showPreview(d.preview);
      } else if (job.step > 0) {
        job.previewStep = job.step;
        fetchPreview(job, job.step);
      }
    }
    if (was !== "running" && job.state === "running" && state.current === job.id) setStatus("running");
    renderProgress();
    if (TERMINAL.has(job.state)) finish(job);
  }

  async function pollJob(job) {
    try {
      apply(job, await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}`));
    } catch (e) {
      if (e.status === 404) { job.done = true; job.state = "gone"; state.jobs.delete(job.id); rememberJobs(); }
    }
  }

  let polling = false;
  async function pollCurrent() {
    const job = state.jobs.get(state.current);
    if (polling || !job || job.done) return;
    polling = true;
    try { await pollJob(job); } finally { polling = false; }
  }

  async function finish(job) {
    if (job.done) return;
    job.done = true;
    job.finished = Date.now();
    rememberJobs();
    let data = null;
    if (job.state === "completed") {
      try { data = await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}`); } catch (e) { setStatus(e.message, "error"); }
    }
    if (data) {
      addResults(data, job.request, true);
      if (state.current === job.id && data.images && data.images.length) showPreview(data.images[0], { crisp: true });
      setStatus(`finished (${data.images ? data.images.length : 0} image${data.images && data.images.length === 1 ? "" : "s"})`, "ok");
    } else if (job.state === "failed") {
      setStatus(`job failed: ${job.error || "unknown error"}`, "error");
    } else if (job.state === "canceled") {
      setStatus("canceled", "ok");
    }
    renderProgress();
    if (state.current === job.id) {
      const next = nextActive();
      if (next) follow(next);
    }
    refreshQueue();
  }

  async function cancelJob(id) {
    try {
      await api("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
      setStatus("cancel requested");
    } catch (e) {
      setStatus(e.message, "error");
    }
    const job = state.jobs.get(id);
    if (job) pollJob(job);
    refreshQueue();
  }

  function connectEvents() {
    if (!window.EventSource) return;
    const source = new EventSource("/v1/events");
    const handle = (ev) => {
      let d;
      try { d = JSON.parse(ev.data); } catch { return; }
      const job = d && state.jobs.get(d.id);
      if (job) apply(job, d);
      else if (d && TERMINAL.has(d.state)) refreshQueue();
    };
    source.onmessage = handle;
    for (const name of ["step", "progress", "job", "state", "preview"]) source.addEventListener(name, handle);
  }

  // ------------------------------------------------------------------ queue
  let queueBusy = false;
  async function refreshQueue() {
    if (queueBusy) return;
    queueBusy = true;
    try {
      const [running, pending] = await Promise.all([
        api("GET", "/v1/jobs?state=running").then(asList),
        api("GET", "/v1/jobs?state=pending").then(asList),
      ]);
      pending.sort((a, b) => (a.position ?? 0) - (b.position ?? 0));
      renderQueue([...running, ...pending]);
      const listed = new Set([...running, ...pending].map((j) => j.id));
      for (const j of [...running, ...pending]) { const mine = state.jobs.get(j.id); if (mine) apply(mine, j); }
      for (const job of state.jobs.values()) if (!job.done && !listed.has(job.id)) pollJob(job);
    } catch { /* server busy or gone: the next tick tries again */ } finally {
      queueBusy = false;
    }
  }

  function renderQueue(jobs) {
    const q = $("queue");
    if (!jobs.length) { q.replaceChildren(el("li", { class: "muted empty" }, "empty")); return; }
    q.replaceChildren(...jobs.map((j) => {
      const mine = state.jobs.get(j.id);
      const req = j.request || (mine && mine.request) || {};
      const pct = j.state === "running" && j.steps ? ` · ${Math.round((100 * (j.step || 0)) / j.steps)} %` : "";
      return el("li", { class: `job ${j.state}`, "data-id": j.id },
        el("span", { class: `badge ${j.state}` }, j.state),
        el("span", { class: "job-prompt", title: req.prompt || "" }, req.prompt || `(${j.kind || "job"})`),
        el("span", { class: "muted" }, j.state === "pending" && j.position != null ? `#${j.position}` : pct.slice(3)),
        mine ? el("button", { type: "button", class: "icon small", title: "Cancel this job", onclick: () => cancelJob(j.id) }, "\u2715") : null);
    }));
  }

  // ------------------------------------------------------------------ gallery
  function addResults(data, request, prepend) {
    if (!data || !data.images || state.gallerySeen.has(data.id)) return;
    state.gallerySeen.add(data.id);
    const info = parseInfo(data.info);
    const req = request || data.request || {};
    const cards = data.images.map((url, i) => card(url, i, info, req, data));
    const g = $("gallery");
    if (prepend) g.prepend(...cards); else g.append(...cards);
  }

  function card(url, i, info, req, data) {
    const seed = (info.all_seeds && info.all_seeds[i]) ?? info.seed ?? req.seed;
    const text = (info.infotexts && info.infotexts[i]) || "";
    const w = info.width ?? req.width, h = info.height ?? req.height;
    const params = [["Seed", seed], ["Steps", info.steps ?? req.steps], ["Sampler", info.sampler_name ?? req.sampler_name],
      ["CFG", info.cfg_scale ?? req.cfg_scale], ["Size", w && h ? `${w}×${h}` : null], ["Model", info.sd_model_name]]
      .filter(([, v]) => v != null && v !== "");
    const prompt = info.prompt ?? req.prompt ?? "";
    const negative = info.negative_prompt ?? req.negative_prompt ?? "";
    const img = el("img", { src: url, alt: prompt || "result", title: text || prompt, loading: "lazy" });
    img.addEventListener("load", () => img.classList.toggle("crisp", img.naturalWidth < 256));
    return el("figure", { class: "card", "data-job": data.id },
      el("a", { href: url, target: "_blank", rel: "noopener" }, img),
      el("figcaption", {},
        el("p", { class: "prompt" }, prompt || el("span", { class: "muted" }, "(no prompt)")),
        negative ? el("p", { class: "negative" }, `− ${negative}`) : null,
        el("dl", { class: "params" }, ...params.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))])),
        text ? el("details", { class: "infotext" }, el("summary", {}, "parameters"), el("pre", {}, text)) : null,
        el("div", { class: "card-actions" },
          el("a", { class: "button small", href: url, download: `sdtorch-${seed ?? data.id}-${i}.png` }, "Download"),
          el("button", { type: "button", class: "ghost small", onclick: () => reuse(req, seed) }, "Reuse"),
          el("button", { type: "button", class: "ghost small", onclick: () => initFromURL(url) }, "img2img"))));
  }

  function reuse(req, seed) {
    const set = (id, v) => { if (v != null) $(id).value = v; };
    set("prompt", req.prompt); set("negative", req.negative_prompt); set("steps", req.steps); set("cfg", req.cfg_scale);
    set("width", req.width); set("height", req.height); set("batch", req.batch_size); set("seed", seed);
    if (req.sampler_name) $("sampler").value = req.sampler_name;
    saveSettings();
    setStatus("settings copied into the form");
  }

  async function loadGallery() {
    const done = asList(await api("GET", "/v1/jobs?state=completed"));
    for (const j of done.slice(-12)) addResults(j.images ? j : await api("GET", `/v1/jobs/${encodeURIComponent(j.id)}`), j.request, true);
  }

  // ------------------------------------------------------------------ img2img and the mask
  const initCanvas = $("init-canvas"), maskCanvas = $("mask-canvas");
  const maskCtx = maskCanvas.getContext("2d");

  function loadInitURL(dataURL) {
    const img = new Image();
    img.onload = () => {
      for (const c of [initCanvas, maskCanvas]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
      initCanvas.getContext("2d").drawImage(img, 0, 0);
      state.init = { dataURL, width: img.naturalWidth, height: img.naturalHeight };
      state.painted = false;
      $("canvas-wrap").hidden = $("mask-tools").hidden = $("strength-field").hidden = false;
      $("drop-hint").hidden = true;
      $("img2img").open = true;
      updateMode();
    };
    img.onerror = () => setStatus("that file is not an image", "error");
    img.src = dataURL;
  }

  function loadInitFile(file) {
    if (!file || !file.type.startsWith("image/")) { setStatus("drop an image file", "error"); return; }
    const reader = new FileReader();
    reader.onload = () => loadInitURL(reader.result);
    reader.readAsDataURL(file);
  }

  async function initFromURL(url) {
    const blob = await (await fetch(url)).blob();
    loadInitFile(new File([blob], "init.png", { type: blob.type || "image/png" }));
    $("img2img").scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  function removeInit() {
    state.init = null;
    state.painted = false;
    $("canvas-wrap").hidden = $("mask-tools").hidden = $("strength-field").hidden = true;
    $("drop-hint").hidden = false;
    updateMode();
  }

  function maskHasPaint() {
    const px = maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i]) return true;
    return false;
  }

  function maskDataURL() {  // white = repaint, black = keep (A1111's mask convention)
    const src = maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
    const out = new ImageData(src.width, src.height);
    for (let i = 0; i < src.data.length; i += 4) {
      const v = src.data[i + 3] > 0 ? 255 : 0;
      out.data[i] = out.data[i + 1] = out.data[i + 2] = v;
      out.data[i + 3] = 255;
    }
    const c = document.createElement("canvas");
    c.width = src.width; c.height = src.height;
    c.getContext("2d").putImageData(out, 0, 0);
    return c.toDataURL("image/png");
  }

  function updateMode() {
    $("img2img-state").textContent = !state.init ? "(img2img, inpainting)"
      : `${state.painted ? "inpainting" : "img2img"} · ${state.init.width}×${state.init.height}`;
  }

  function bindMask() {
    let last = null;
    const pos = (e) => {
      const r = maskCanvas.getBoundingClientRect();
      return [(e.clientX - r.left) * (maskCanvas.width / r.width), (e.clientY - r.top) * (maskCanvas.height / r.height)];
    };
    const stroke = (a, b) => {
      const r = maskCanvas.getBoundingClientRect();
      maskCtx.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
      maskCtx.strokeStyle = maskCtx.fillStyle = "#ff3d6e";
      maskCtx.lineCap = maskCtx.lineJoin = "round";
      maskCtx.lineWidth = Number($("brush").value) * (maskCanvas.width / r.width);
      maskCtx.beginPath();
      maskCtx.moveTo(a[0], a[1]);
      maskCtx.lineTo(b[0] + 0.01, b[1]);
      maskCtx.stroke();
    };
    maskCanvas.addEventListener("pointerdown", (e) => {
      maskCanvas.setPointerCapture(e.pointerId);
      last = pos(e);
      stroke(last, last);
    });
    maskCanvas.addEventListener("pointermove", (e) => { if (last) { const p = pos(e); stroke(last, p); last = p; } });
    const end = () => { if (last) { last = null; state.painted = maskHasPaint(); updateMode(); } };
    maskCanvas.addEventListener("pointerup", end);
    maskCanvas.addEventListener("pointercancel", end);
    $("mask-clear").onclick = () => { maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height); state.painted = false; updateMode(); };
    $("init-remove").onclick = removeInit;
  }

  function bindDrop() {
    const drop = $("drop");
    const over = (on) => (e) => { e.preventDefault(); drop.classList.toggle("over", on); };
    drop.addEventListener("dragenter", over(true));
    drop.addEventListener("dragover", over(true));
    drop.addEventListener("dragleave", over(false));
    // Anywhere on the page: a dropped image becomes the init image instead of replacing the page.
    document.addEventListener("dragover", (e) => e.preventDefault());
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer && e.dataTransfer.files[0];
      if (file) { loadInitFile(file); return; }
      const url = e.dataTransfer && (e.dataTransfer.getData("text/uri-list") || e.dataTransfer.getData("text/plain"));
      if (url) initFromURL(url.split("\n")[0].trim()).catch(() => setStatus("could not read the dropped image", "error"));
    });
    $("init-file").onchange = (e) => loadInitFile(e.target.files[0]);
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
      if (item) loadInitFile(item.getAsFile());
    });
  }

  // ------------------------------------------------------------------ settings and resume
  function saveSettings() {
    const s = Object.fromEntries(FIELDS.map((id) => [id, $(id).value]));
    try { localStorage.setItem("sdtorch.settings", JSON.stringify(s)); } catch { /* private mode */ }
  }

  function restoreSettings() {
    let s = {};
    try { s = JSON.parse(localStorage.getItem("sdtorch.settings") || "{}"); } catch { /* ignore */ }
    for (const id of FIELDS) {
      if (s[id] == null) continue;
      if ($(id).tagName === "SELECT") $(id).dataset.saved = s[id]; else $(id).value = s[id];
    }
    $("strength-out").textContent = $("strength").value;
  }

  function rememberJobs() {
    const active = [...state.jobs.values()].filter((j) => !j.done).map((j) => ({ id: j.id, request: j.request, kind: j.kind }));
    try { sessionStorage.setItem("sdtorch.jobs", JSON.stringify(active)); } catch { /* ignore */ }
  }

  function resumeJobs() {
    let saved = [];
    try { saved = JSON.parse(sessionStorage.getItem("sdtorch.jobs") || "[]"); } catch { /* ignore */ }
    for (const s of saved) {
      state.jobs.set(s.id, { ...s, state: "pending", step: 0, steps: s.request && s.request.steps, eta: null,
                             previewStep: -1, done: false, started: Date.now() });
    }
    const next = nextActive();
    if (next) follow(next);
  }

  function init() {
    restoreSettings();
    $("form").addEventListener("submit", submit);
    $("form").addEventListener("change", saveSettings);
    $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit(); });
    $("cancel").onclick = () => { if (state.current) cancelJob(state.current); };
    $("model").onchange = switchModel;
    $("seed-random").onclick = () => { $("seed").value = -1; saveSettings(); };
    $("strength").oninput = () => { $("strength-out").textContent = $("strength").value; };
    $("gallery-clear").onclick = () => $("gallery").replaceChildren();
    bindDrop();
    bindMask();
    resumeJobs();
    for (const [what, load] of [["samplers", loadSamplers], ["schedulers", loadSchedulers], ["models", loadModels], ["results", loadGallery]]) {
      load().catch((e) => setStatus(`could not load ${what}: ${e.message}`, "error"));
    }
    connectEvents();
    refreshQueue();
    setInterval(pollCurrent, 300);
    setInterval(refreshQueue, 1500);
  }

  init();
})();
