// The playground: a client of the public API, nothing more. A request goes to POST /v1/jobs (multipart, the image
// as a file part); the job's Server-Sent Events stream brings each denoising step and then the result (the job is
// polled instead when a stream cannot be read or breaks). Every URL is relative to the page, so the page also works
// behind a path prefix. Fetch, not EventSource: EventSource cannot send the API key's Authorization header.
"use strict";

const KEY_STORAGE = "flux-playground-api-key";
const ACCEPTED_TYPES = ["image/png", "image/jpeg", "image/webp"];
const MEDIA_TYPES = { png: "image/png", jpeg: "image/jpeg", webp: "image/webp" };
const FINISHED = ["succeeded", "failed", "cancelled"];
const POLL_INTERVAL_MS = 700;

const $ = (id) => document.getElementById(id);
const state = { file: null, previewUrl: null, job: null, abort: null, seedGiven: null };

// ----- talking to the server --------------------------------------------------------------------------------------
function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {}

// The service's error envelope {"error": {"type", "message"}} as one line a person can act on.
async function apiError(response) {
  const text = await response.text();
  let message = text.trim() || response.statusText;
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    // not JSON: keep the text
  }
  let hint = "";
  if (response.status === 401 || response.status === 403) hint = "\nEnter a valid key under “API key”.";
  return new ApiError(`${response.status} ${response.statusText}: ${message}${hint}`);
}

async function api(url, options = {}) {
  const response = await fetch(url, { cache: "no-store", ...options, headers: authHeaders(options.headers) });
  if (!response.ok) throw await apiError(response);
  return response;
}

// Server-Sent Events from a fetch body: calls onEvent(name, data) per event until it returns true or the stream
// ends. Returns whether onEvent finished it.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    pending += value;
    const cut = pending.endsWith("\r") ? pending.length - 1 : pending.length; // a \r\n may be split across chunks
    buffer += pending.slice(0, cut).replace(/\r\n?/g, "\n");
    pending = pending.slice(cut);
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // comments are keep-alive pings
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = text;
        else if (field === "data") data.push(text);
      }
      if (data.length && onEvent(name, JSON.parse(data.join("\n")))) {
        reader.cancel().catch(() => {});
        return true;
      }
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    });
  });
}

async function pollJob(url, onEvent, signal) {
  for (;;) {
    const job = await (await api(url, { signal })).json();
    if (onEvent(job.status === "running" ? "progress" : job.status, job)) return;
    await sleep(POLL_INTERVAL_MS, signal);
  }
}

async function followJob(job, onEvent, signal) {
  try {
    const response = await api(job.urls.events, { headers: { Accept: "text/event-stream" }, signal });
    if (await readEvents(response, onEvent)) return;
    logEvent("the event stream ended early; polling the job");
  } catch (error) {
    if (error.name === "AbortError") throw error;
    logEvent(`no event stream (${error.message}); polling the job`);
  }
  await pollJob(job.urls.get, onEvent, signal);
}

// ----- the form -----------------------------------------------------------------------------------------------------
function setFile(file) {
  clearError();
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.file = null;
  state.previewUrl = null;
  $("image").value = "";
  const preview = $("preview");
  preview.hidden = true;
  preview.removeAttribute("src");
  $("clear-image").hidden = true;
  $("image-info").textContent = "";
  if (file && file.type && !ACCEPTED_TYPES.includes(file.type)) {
    showError(`${file.name} is ${file.type}, not an image this server reads: pick a PNG, JPEG or WebP file.`);
    file = null;
  }
  if (file) {
    state.file = file;
    state.previewUrl = URL.createObjectURL(file);
    preview.src = state.previewUrl;
    preview.hidden = false;
    $("clear-image").hidden = false;
    $("image-info").textContent = `${file.name} · ${formatBytes(file.size)}`;
  }
  updateHints();
}

function formatBytes(size) {
  if (size < 1024) return `${size} B`;
  if (size < 1024 * 1024) return `${(size / 1024).toFixed(1)} KB`;
  return `${(size / 1024 / 1024).toFixed(1)} MB`;
}

function updateHints() {
  const size = $("size").value;
  for (const field of document.querySelectorAll(".custom-size")) field.hidden = size !== "custom";
  $("quality-field").hidden = $("output_format").value === "png";
  let hint = "";
  if (size === "auto") {
    hint = state.file
      ? "Automatic: the input's aspect ratio, snapped to the nearest preferred Kontext resolution."
      : "Automatic: 1024×1024 for text-to-image.";
  } else if (size !== "custom") {
    hint = `${size}, snapped to the nearest preferred Kontext resolution.`;
  } else {
    hint = "Multiples of 16, from 256 to 1568.";
  }
  $("size-hint").textContent = hint;
}

function requestForm() {
  const form = new FormData();
  form.append("prompt", $("prompt").value);
  if (state.file) form.append("image", state.file, state.file.name || "image");
  const size = $("size").value;
  if (size === "custom") {
    form.append("width", $("width").value);
    form.append("height", $("height").value);
  } else if (size !== "auto") {
    form.append("aspect_ratio", size);
  }
  const optional = ["steps", "seed", "scheduler", "guidance_scale", "num_images"];
  for (const name of optional) {
    const value = $(name).value.trim();
    if (value !== "") form.append(name, value);
  }
  const format = $("output_format").value;
  form.append("output_format", format);
  if (format !== "png" && $("output_quality").value.trim() !== "") {
    form.append("output_quality", $("output_quality").value.trim());
  }
  return form;
}

async function submit(event) {
  event.preventDefault();
  clearError();
  if (!$("prompt").value.trim()) {
    showError("Write an instruction (or, without an image, a description) first.");
    $("prompt").focus();
    return;
  }
  state.seedGiven = $("seed").value.trim() || null;
  resetOutput();
  setBusy(true);
  setStatus("Submitting…", 0, 1);
  state.abort = new AbortController();
  const signal = state.abort.signal;
  try {
    const response = await api("v1/jobs", {
      method: "POST",
      body: requestForm(),
      headers: { Accept: "application/json" },
      signal,
    });
    state.job = await response.json();
    logEvent(`job ${state.job.id} queued`);
    setStatus("Queued", 0, 1);
    await followJob(state.job, onJobEvent, signal);
  } catch (error) {
    if (error.name !== "AbortError") {
      showError(error instanceof ApiError ? error.message : `The request did not complete: ${error.message}`);
      $("status").hidden = true;
    }
  } finally {
    setBusy(false);
    state.job = null;
    state.abort = null;
  }
}

// One job event (or polled state); true when the job has finished.
function onJobEvent(name, job) {
  if (name === "queued") {
    setStatus("Queued: waiting for the GPU", 0, 1);
  } else if (name === "progress" && job.progress) {
    const { step, steps } = job.progress;
    const eta = job.eta_s != null ? ` · about ${job.eta_s.toFixed(1)} s left` : "";
    setStatus(`Step ${step} of ${steps}${eta}`, step, steps);
    logEvent(`step ${step} of ${steps}`);
  } else if (name === "succeeded") {
    setStatus("Done", 1, 1);
    logEvent("succeeded");
    showResult(job.result, job.id);
  } else if (name === "failed") {
    const error = job.error || {};
    showError(`${job.status_code || ""} ${error.type || "failed"}: ${error.message || "the job failed"}`.trim());
    $("status").hidden = true;
    logEvent("failed");
  } else if (name === "cancelled") {
    setStatus("Cancelled", 0, 1);
    logEvent("cancelled");
  }
  return FINISHED.includes(name) || FINISHED.includes(job.status);
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    await api(state.job.urls.cancel, { method: "DELETE" });
  } catch (error) {
    showError(error.message);
  }
}

// ----- showing things -----------------------------------------------------------------------------------------------
function setBusy(busy) {
  $("generate").disabled = busy;
  $("generate").textContent = busy ? "Working…" : "Generate";
  $("cancel").hidden = !busy;
  $("cancel").disabled = false;
}

function setStatus(text, value, max) {
  $("status").hidden = false;
  $("status-text").textContent = text;
  $("progress").max = max;
  $("progress").value = value;
}

function logEvent(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("events").append(item);
  item.scrollIntoView({ block: "nearest" });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("empty").hidden = true;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function resetOutput() {
  $("events").replaceChildren();
  $("result").hidden = true;
  $("empty").hidden = true;
  $("images").replaceChildren();
}

function element(tag, text, attributes = {}) {
  const node = document.createElement(tag);
  if (text != null) node.textContent = text;
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

// A seed the person typed may exceed what a JS number holds exactly: shown from what was typed.
function seedOf(image, index) {
  try {
    if (state.seedGiven) return (BigInt(state.seedGiven) + BigInt(index)).toString();
  } catch (_) {
    // not an integer as typed: the server's number
  }
  return String(image.seed);
}

function showResult(result, jobId) {
  const images = $("images");
  images.replaceChildren();
  result.images.forEach((image, index) => {
    const source = `data:${MEDIA_TYPES[image.format]};base64,${image.image}`;
    const figure = element("figure");
    const img = element("img", null, { src: source, alt: `Result ${index + 1}: ${result.prompt}` });
    const name = `${jobId}-${index}.${image.format}`;
    const caption = element("figcaption", `${image.width}×${image.height} · seed ${seedOf(image, index)} · `);
    caption.append(element("a", "download", { href: source, download: name }));
    figure.append(img, caption);
    images.append(figure);
  });

  const summary = $("summary");
  summary.replaceChildren();
  const first = result.images[0];
  const rows = [
    ["Mode", result.mode === "edit" ? "edit" : "text-to-image"],
    ["Size", `${first.width}×${first.height} (${result.size_source.replaceAll("_", " ")})`],
    ["Input resized to", result.context_size ? result.context_size.join("×") : null],
    ["Steps", `${result.steps} · ${result.scheduler}`],
    ["Guidance", String(result.guidance_scale)],
    ["Seed", result.images.map(seedOf).join(", ")],
    ["First-block cache", cacheText(result.first_block_cache)],
    ["CUDA graphs", graphsText(result.cuda_graphs)],
    ["Model", modelText(result.model)],
    ["Job", jobId],
  ];
  for (const [label, value] of rows) {
    if (value == null) continue;
    summary.append(element("dt", label), element("dd", value, { "data-field": label.toLowerCase() }));
  }

  const timings = $("timings").tBodies[0];
  timings.replaceChildren();
  for (const [stage, ms] of Object.entries(result.timings_ms)) {
    const row = element("tr");
    row.append(element("td", stage.replaceAll("_", " ")), element("td", ms.toFixed(1)));
    timings.append(row);
  }

  const optimizations = result.optimizations || {};
  $("ran").replaceChildren(...(optimizations.ran || []).map((name) => element("li", name)));
  const notes = [
    ...(optimizations.not_applied || []).map((n) => `${n.optimization} (${n.flag}): ${n.reason}`),
    ...(optimizations.could_not_turn_off || []).map((n) => `could not turn off: ${JSON.stringify(n)}`),
  ];
  $("not-applied").replaceChildren(...notes.map((text) => element("li", text)));
  $("warnings").replaceChildren(...(result.warnings || []).map((text) => element("li", text)));
  $("result").hidden = false;
}

function cacheText(cache) {
  if (!cache) return null;
  return `threshold ${cache.threshold}: ${cache.computed} computed, ${cache.skipped} skipped`;
}

function graphsText(graphs) {
  if (!graphs) return null;
  return Object.entries(graphs)
    .map(([key, value]) => `${key.replaceAll("_", " ")} ${value}`)
    .join(", ");
}

function modelText(model) {
  if (!model) return null;
  return model.demo ? `${model.source} (random weights: the images are noise)` : model.source;
}

// ----- the server's state -------------------------------------------------------------------------------------------
async function checkServer() {
  const line = $("server");
  let retry = 3000;
  try {
    const response = await fetch("health", { cache: "no-store", headers: authHeaders() });
    if (response.status === 401 || response.status === 403) {
      line.className = "server wait";
      line.textContent = "The server answers; its state needs an API key.";
    } else {
      const health = await response.json();
      const device = health.device ? ` on ${health.device.type}${health.device.name ? ` (${health.device.name})` : ""}` : "";
      const model = health.model ? `${health.model.source}${health.demo ? ", random weights (demo)" : ""}` : "";
      if (response.ok) {
        line.className = "server ok";
        line.textContent = `Ready: ${model}${device}`;
        retry = 30000;
      } else {
        line.className = health.state === "failed" ? "server bad" : "server wait";
        line.textContent = `${health.state}${health.reason ? `: ${health.reason}` : ""}`;
      }
    }
  } catch (error) {
    line.className = "server bad";
    line.textContent = `The server does not answer (${error.message}).`;
  }
  setTimeout(checkServer, retry);
}

// Scheduler names from the OpenAPI document, where it can be read (with FLUX_AUTH_PROTECT_INFO it needs the key).
async function loadSchedulers() {
  try {
    const doc = await (await api("openapi.json")).json();
    const body = doc.paths["/inference"].post.requestBody.content["application/json"];
    const field = body.schema.properties.scheduler;
    const names = (field.enum || (field.anyOf || []).flatMap((choice) => choice.enum || [])).filter(Boolean);
    const select = $("scheduler");
    for (const name of names) select.append(element("option", name, { value: name }));
  } catch (_) {
    // the server default still works
  }
}

function showKeyState() {
  $("key-state").textContent = $("api-key").value.trim() ? "(set)" : "";
}

// ----- wiring -------------------------------------------------------------------------------------------------------
function init() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  showKeyState();
  $("api-key").addEventListener("input", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    showKeyState();
  });
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    showKeyState();
  });

  $("image").addEventListener("change", () => setFile($("image").files[0] || null));
  $("clear-image").addEventListener("click", () => setFile(null));
  $("preview").addEventListener("load", () => {
    const preview = $("preview");
    if (state.file) $("image-info").textContent = `${state.file.name} · ${preview.naturalWidth}×${preview.naturalHeight} · ${formatBytes(state.file.size)}`;
  });
  $("preview").addEventListener("error", () => {
    $("preview").hidden = true;
    if (state.file) $("image-info").textContent = `${state.file.name}: this browser shows no preview of it; the server will check it.`;
  });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) setFile(event.dataTransfer.files[0]);
  });

  $("size").addEventListener("change", updateHints);
  $("output_format").addEventListener("change", updateHints);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
  });
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  updateHints();
  checkServer();
  loadSchedulers();
}

init();
