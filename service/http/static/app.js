// The try-the-model page: one image (chosen, dropped, pasted or drawn) -> POST v1/classify -> top 5.
// Plain browser JavaScript, no build step and no external resources, so it works offline.
"use strict";

const TOP_K = 5;
const KEY_STORAGE = "vitserve.apiKey"; // sessionStorage: the key lives as long as the tab, not on disk

const $ = (id) => document.getElementById(id);
const el = {
  modelName: $("model-name"),
  modelDetails: $("model-details"),
  keyForm: $("key-form"),
  keyInput: $("api-key"),
  dropZone: $("drop-zone"),
  fileInput: $("file-input"),
  preview: $("preview"),
  canvas: $("canvas"),
  classifyDrawing: $("classify-drawing"),
  clearDrawing: $("clear-drawing"),
  status: $("status"),
  results: $("results"),
  timing: $("timing"),
};

// --- API --------------------------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The service answers errors as {"error": {"code", "message"}} (/v2 as {"error": "..."});
// anything else (a proxy's HTML page, an empty body) falls back to the HTTP status line.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

async function loadModel() {
  el.modelName.textContent = "loading…";
  el.modelDetails.textContent = "";
  let response;
  try {
    response = await fetch("v1/models", { headers: authHeaders() });
  } catch (err) {
    el.modelName.textContent = "unreachable";
    showError(`cannot reach the server: ${err.message}`);
    return;
  }
  if (!response.ok) {
    el.modelName.textContent = "unavailable";
    await showResponseError(response);
    return;
  }
  const info = await response.json();
  el.modelName.textContent = info.architecture || info.name || info.model || "unknown";
  const details = [];
  const classes = info.num_classes ?? (Array.isArray(info.labels) ? info.labels.length : undefined);
  if (classes !== undefined) details.push(`${classes} classes`);
  const size = info.image_size ?? info.preprocessing?.image_size;
  if (size !== undefined) details.push(`${size}×${size} px`);
  if (info.precision) details.push(info.precision);
  el.modelDetails.textContent = details.length ? `(${details.join(", ")})` : "";
  if (el.status.classList.contains("error")) showStatus("Choose, drop, paste or draw an image.");
}

async function classify(blob, what) {
  setBusy(true);
  showStatus(`Classifying ${what}…`);
  el.results.replaceChildren();
  el.timing.textContent = "";
  const started = performance.now();
  try {
    const response = await fetch(`v1/classify?top_k=${TOP_K}`, {
      method: "POST",
      // An empty type (unknown file) is sent as such: the server names the problem.
      headers: { ...authHeaders(), "Content-Type": blob.type || "application/octet-stream" },
      body: blob,
    });
    if (!response.ok) {
      await showResponseError(response);
      return;
    }
    const result = await response.json();
    renderResult(result, performance.now() - started);
    showStatus(`Top ${result.predictions.length} for ${what}.`);
  } catch (err) {
    showError(`request failed: ${err.message}`);
  } finally {
    setBusy(false);
  }
}

// --- rendering --------------------------------------------------------------------------------

function showStatus(text) {
  el.status.textContent = text;
  el.status.classList.remove("error");
}

function showError(text) {
  el.status.textContent = text;
  el.status.classList.add("error");
}

async function showResponseError(response) {
  const message = await errorMessage(response);
  if (response.status === 401) {
    showError(`${message}. Enter the server's API key above.`);
    el.keyInput.focus();
  } else {
    showError(message);
  }
}

function setBusy(busy) {
  el.classifyDrawing.disabled = busy;
  el.fileInput.disabled = busy;
}

function renderResult(result, roundTripMs) {
  // textContent only: labels come from the model file and are never parsed as HTML.
  const rows = result.predictions.map((p) => {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    label.title = `class ${p.index}`;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * p.probability).toFixed(1)}%`; // CSSOM, allowed by the page's CSP
    bar.append(fill);
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = `${(100 * p.probability).toFixed(1)}%`;
    li.append(label, bar, prob);
    return li;
  });
  el.results.replaceChildren(...rows);

  const t = result.timing_ms || {};
  const parts = ["queue", "preprocess", "inference"]
    .filter((k) => typeof t[k] === "number")
    .map((k) => `${k} ${t[k].toFixed(1)}`);
  const server = typeof t.total === "number" ? `server ${t.total.toFixed(1)} ms` : "";
  el.timing.textContent = [
    server && (parts.length ? `${server} (${parts.join(", ")})` : server),
    `round trip ${roundTripMs.toFixed(1)} ms`,
  ].filter(Boolean).join(" · ");
}

let previewUrl = null;
function showPreview(blob) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(blob);
  el.preview.src = previewUrl;
  el.preview.hidden = false;
}

function classifyFile(file, how) {
  if (!file) return;
  showPreview(file);
  classify(file, file.name ? `“${file.name}”` : `the ${how} image`);
}

// --- image input: choose, drop, paste ---------------------------------------------------------

el.fileInput.addEventListener("change", () => {
  classifyFile(el.fileInput.files[0], "chosen");
  el.fileInput.value = ""; // choosing the same file again fires "change" again
});

for (const type of ["dragenter", "dragover"]) {
  el.dropZone.addEventListener(type, (event) => {
    event.preventDefault(); // without this the browser opens the dropped file itself
    el.dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  el.dropZone.addEventListener(type, () => el.dropZone.classList.remove("dragging"));
}
el.dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  classifyFile(event.dataTransfer.files[0], "dropped");
});

document.addEventListener("paste", (event) => {
  if (event.target === el.keyInput) return; // pasting a key is not pasting an image
  const item = [...event.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
  if (item) {
    event.preventDefault();
    classifyFile(item.getAsFile(), "pasted");
  }
});

// --- drawing: white canvas, dark thick pen (what the digits demo was trained on) ---------------

const pen = el.canvas.getContext("2d");
let drawing = false;
let drawn = false;

function clearCanvas() {
  pen.fillStyle = "#ffffff";
  pen.fillRect(0, 0, el.canvas.width, el.canvas.height);
  drawn = false;
}

function canvasPoint(event) {
  // The canvas may be displayed smaller than its 280×280 backing store.
  const rect = el.canvas.getBoundingClientRect();
  return [
    ((event.clientX - rect.left) * el.canvas.width) / rect.width,
    ((event.clientY - rect.top) * el.canvas.height) / rect.height,
  ];
}

el.canvas.addEventListener("pointerdown", (event) => {
  drawing = true;
  el.canvas.setPointerCapture(event.pointerId);
  const [x, y] = canvasPoint(event);
  pen.strokeStyle = "#111111";
  pen.fillStyle = "#111111";
  // The digits were trained on thick strokes filling their box: a ~35 px pen on 280 px matches them
  // (measured: 9/10 drawn digits right, against 5/10 with a 23 px pen).
  pen.lineWidth = el.canvas.width / 8;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.beginPath();
  pen.arc(x, y, pen.lineWidth / 2, 0, 2 * Math.PI); // a click alone leaves a dot
  pen.fill();
  pen.beginPath();
  pen.moveTo(x, y);
  drawn = true;
});
el.canvas.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const [x, y] = canvasPoint(event);
  pen.lineTo(x, y);
  pen.stroke();
});
for (const type of ["pointerup", "pointercancel"]) {
  el.canvas.addEventListener(type, () => {
    drawing = false;
  });
}

el.clearDrawing.addEventListener("click", clearCanvas);
el.classifyDrawing.addEventListener("click", () => {
  if (!drawn) {
    showError("Draw something on the canvas first.");
    return;
  }
  el.canvas.toBlob((blob) => {
    showPreview(blob);
    classify(blob, "the drawing");
  }, "image/png");
});

// --- API key ----------------------------------------------------------------------------------

el.keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
el.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = el.keyInput.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  loadModel();
});

clearCanvas();
loadModel();
