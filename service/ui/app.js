// The page's whole behaviour: plain JavaScript, no build step, no third-party code.
// It calls the same endpoints as any integrator (POST v1/classify?explain=true, GET v1/models,
// GET v1/models/card) with relative URLs, so it works behind a proxy that adds a path prefix.
// Text from the service is only ever set with textContent; the one HTML it inserts is the model
// card, which the service renders from escaped Markdown (service/ui/markdown.py).
"use strict";

(() => {
  const KEY_STORE = "lesionserve.apiKey";
  const CLIENT_TIMEOUT_MS = 120000; // the service has its own deadline (504); this only ends a hung connection
  const $ = (id) => document.getElementById(id);

  let current = null; // {seq, controller} of the request in flight
  let seq = 0;
  let shown = null; // the answer on screen

  // --- API key (sessionStorage: gone when the tab closes) ---------------------------------
  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch {
      return "";
    }
  }

  function headers(extra) {
    const h = new Headers(extra || {});
    const key = apiKey();
    if (key) h.set("Authorization", "Bearer " + key);
    return h;
  }

  function askForKey(message) {
    $("key-section").hidden = false;
    if (message) $("key-why").textContent = message;
  }

  // --- problem+json -------------------------------------------------------------------------
  async function readProblem(resp) {
    const requestId = resp.headers.get("x-request-id");
    const retryAfter = resp.headers.get("retry-after");
    const type = resp.headers.get("content-type") || "";
    if (type.includes("json")) {
      try {
        const body = await resp.json();
        if (body && (body.title || body.detail)) {
          return {
            title: String(body.title || "HTTP " + resp.status),
            detail: String(body.detail || ""),
            status: body.status || resp.status,
            type: body.type || "",
            requestId: body.request_id || requestId,
            retryAfter,
          };
        }
      } catch {
        // fall through: not the JSON it said it was
      }
    }
    return {
      title: ("HTTP " + resp.status + " " + resp.statusText).trim(),
      detail: "The answer carried no problem description (perhaps from a proxy between this page and the service).",
      status: resp.status,
      type: "",
      requestId,
      retryAfter,
    };
  }

  function showError(problem) {
    $("error-title").textContent = problem.title;
    $("error-detail").textContent = problem.detail;
    const meta = [];
    if (problem.status) meta.push("HTTP " + problem.status);
    if (problem.type) meta.push(problem.type);
    if (problem.requestId) meta.push("request id " + problem.requestId);
    if (problem.retryAfter) meta.push("retry after " + problem.retryAfter + " s");
    $("error-meta").textContent = meta.join(" · ");
    $("error").hidden = false;
    if (problem.status === 401) {
      askForKey("The service refused the request: " + problem.detail + ". Enter a valid API key.");
      $("api-key").focus();
    }
  }

  function hideError() {
    $("error").hidden = true;
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  // --- formatting -------------------------------------------------------------------------------
  const pct = (p, digits = 1) => (p * 100).toFixed(digits) + " %";
  const ms = (v) => (v < 10 ? v.toFixed(1) : v.toFixed(0)) + " ms";

  function bytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
    return (n / 1024 / 1024).toFixed(1) + " MiB";
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function fillList(dl, rows) {
    dl.replaceChildren();
    for (const [term, value, mono] of rows) {
      if (value === undefined || value === null || value === "") continue;
      dl.append(el("dt", term), el("dd", String(value), mono ? "mono" : null));
    }
  }

  // --- the model's description ------------------------------------------------------------------
  let modelInfo = null;

  async function loadModel() {
    let resp;
    try {
      resp = await fetch("v1/models", { headers: headers({ Accept: "application/json" }) });
    } catch (err) {
      $("model-line").textContent = "Could not reach the service: " + err.message;
      return;
    }
    if (resp.status === 401) {
      $("model-line").textContent = "Enter the API key to see which model is loaded.";
      askForKey(apiKey() ? "The stored API key was refused; enter a valid one." : null);
      return;
    }
    if (!resp.ok) {
      const p = await readProblem(resp);
      $("model-line").textContent = "Could not load the model's description: " + p.title + ". " + p.detail;
      return;
    }
    modelInfo = (await resp.json()).models[0];
    $("model-line").textContent =
      "Model " + modelInfo.name + " " + modelInfo.version + " · " + modelInfo.classes.length + " classes · input " +
      modelInfo.input_size + " px · " + modelInfo.provider;
  }

  // --- classify -------------------------------------------------------------------------------
  function clearResult() {
    shown = null;
    $("result").hidden = true;
    $("summary").textContent = "";
  }

  async function classify(file, note) {
    if (current) current.controller.abort(); // the newest image wins; an older answer is never shown for it
    const mine = { seq: ++seq, controller: new AbortController() };
    current = mine;
    const timer = setTimeout(() => mine.controller.abort("timeout"), CLIENT_TIMEOUT_MS);
    const name = file.name || "pasted image";
    clearResult();
    hideError();
    setStatus("Classifying " + name + " (" + bytes(file.size) + ")…" + (note ? " " + note : ""));
    const form = new FormData();
    form.append("image", file, file.name || "pasted-image");
    try {
      const resp = await fetch("v1/classify?explain=true", {
        method: "POST",
        body: form,
        headers: headers({ Accept: "application/json" }),
        signal: mine.controller.signal,
      });
      if (mine.seq !== seq) return;
      if (!resp.ok) {
        showError(await readProblem(resp));
        setStatus("Not classified: " + name + ".");
        return;
      }
      const answer = await resp.json();
      if (mine.seq !== seq) return;
      render(answer, file);
      setStatus("Classified " + name + ".");
    } catch (err) {
      if (mine.seq !== seq) return; // replaced by a newer image
      const timedOut = mine.controller.signal.reason === "timeout";
      showError({
        title: timedOut ? "No answer" : "Could not reach the service",
        detail: timedOut ? "No answer within " + CLIENT_TIMEOUT_MS / 1000 + " s." : String(err.message || err),
        status: 0,
      });
      setStatus("Not classified: " + name + ".");
    } finally {
      clearTimeout(timer);
      if (current === mine) current = null;
    }
  }

  function fromFiles(files, how) {
    const list = Array.from(files || []);
    if (!list.length) return;
    const note = list.length > 1 ? "(" + list.length + " files " + how + ": only the first is classified.)" : "";
    classify(list[0], note);
  }

  // --- render -----------------------------------------------------------------------------------
  function render(answer, file) {
    shown = answer;
    const top = answer.top;
    const m = answer.malignancy;
    const ood = answer.ood || { available: false };
    const flagged = ood.available && ood.out_of_distribution;

    // out-of-distribution warning (text + icon; the panel's colour is a third signal, never the only one)
    $("ood").hidden = !flagged;
    if (flagged) {
      $("ood-text").textContent =
        (top.warning || "This image looks unlike the images the model was trained on.") +
        " Score " + ood.score.toFixed(4) + " > threshold " + ood.threshold.toFixed(4) + " (" + ood.method + ").";
    }

    // the image as the model saw it, and its heatmap
    const ex = answer.explanation || {};
    const crop = $("crop");
    crop.hidden = !ex.input_png_base64;
    const toggle = $("heatmap-toggle");
    toggle.disabled = !ex.available;
    $("heatmap-note").textContent = ex.available ? "" : ex.detail || "No heatmap in this answer.";
    showCrop();
    $("crop-caption").textContent = ex.width
      ? "Centre crop resized to " + ex.width + " × " + ex.height + " px: the image as the model saw it."
      : "The service returned no model-input image.";

    // malignancy against its threshold: words and an arrow, not colour alone
    const above = m.above_threshold;
    const mal = $("malignancy");
    mal.className = "malignancy " + (above ? "above" : "below");
    mal.replaceChildren(
      el("span", above ? "▲" : "▼", "icon"),
      el("strong", above ? " Above threshold" : " Below threshold"),
      document.createTextNode(": score " + pct(m.score, 2) + (above ? " ≥ " : " < ") + "threshold " + pct(m.threshold, 2)),
    );
    mal.firstChild.setAttribute("aria-hidden", "true");
    $("malignancy-bar").style.width = Math.min(100, m.score * 100) + "%";
    $("malignancy-bar").className = "scale-fill " + (above ? "above" : "below");
    $("threshold-mark").style.left = Math.min(100, m.threshold * 100) + "%";
    $("malignancy-classes").textContent = "Score = sum of the probabilities of " + m.classes.join(", ") + ".";

    // ranked classes with their bars
    const list = $("classes");
    list.replaceChildren();
    for (const c of answer.predictions) {
      const li = el("li");
      li.dataset.code = c.code;
      const label = el("span", null, "cls-label");
      label.append(el("span", c.name, "cls-name"), document.createTextNode(" "), el("code", c.code));
      if (m.classes.includes(c.code)) label.append(el("span", "malignant", "tag"));
      const value = el("span", pct(c.probability), "pct");
      const bar = el("span", null, "bar");
      bar.setAttribute("aria-hidden", "true");
      const fill = el("span", null, "fill" + (m.classes.includes(c.code) ? " malignant" : ""));
      fill.style.width = c.probability * 100 + "%";
      bar.append(fill);
      li.append(label, value, bar);
      list.append(li);
    }

    // model, request, DICOM
    fillList($("model-details"), [
      ["Name", answer.model.name],
      ["Version", answer.model.version],
      ["sha256", answer.model.sha256, true],
      ["Provider", modelInfo && modelInfo.provider],
      [
        "Out-of-distribution check",
        ood.available
          ? ood.method + ", score " + ood.score.toFixed(4) + " (threshold " + ood.threshold.toFixed(4) + "): " +
            (flagged ? "flagged" : "passed")
          : ood.detail || "unavailable",
      ],
    ]);
    const t = answer.timing_ms;
    fillList($("request-details"), [
      ["Request id", answer.request_id, true],
      ["File", (file.name || "pasted image") + " (" + bytes(file.size) + ")"],
      ["Image", answer.image.width + " × " + answer.image.height + " px, " + answer.image.format],
      ["Timings", "decode " + ms(t.decode) + " · queue " + ms(t.queue) + " · inference " + ms(t.inference) + " · total " + ms(t.total)],
      ["Batch size", answer.batch_size],
    ]);
    const d = answer.dicom;
    $("dicom").hidden = !d;
    if (d) {
      const ids = Object.entries(d.identifiers || {}).map(([k, v]) => [k, v, true]);
      fillList($("dicom-details"), [
        ["SOP class", d.sop_class_name + " (" + d.sop_class_uid + ")"],
        ["Transfer syntax", d.transfer_syntax_name + " (" + d.transfer_syntax_uid + ")"],
        ["Frames", d.frames + (d.frames > 1 ? " (the first is classified)" : "")],
        ...ids,
      ]);
    }

    $("result").hidden = false;
    $("summary").textContent =
      "Result: top class " + top.name + ", " + pct(top.probability) + ". Malignancy score " + pct(m.score, 2) +
      (above ? ", above" : ", below") + " the threshold " + pct(m.threshold, 2) + "." +
      (flagged ? " Warning: the image looks unlike the training data." : "");
  }

  function showCrop() {
    if (!shown) return;
    const ex = shown.explanation || {};
    const heat = $("heatmap-toggle").checked && ex.available;
    const crop = $("crop");
    const b64 = heat ? ex.png_base64 : ex.input_png_base64;
    if (b64) crop.src = "data:image/png;base64," + b64;
    crop.alt = heat
      ? "Model input with the class activation heatmap of " + ex.class + " over it (red: strongest evidence)"
      : "The image as the model saw it (centre crop, resized)";
  }

  // --- the model card (fetched with the key, shown in a dialog) -------------------------------
  async function openCard(event) {
    event.preventDefault();
    const body = $("card-body");
    body.replaceChildren(el("p", "Loading the model card…"));
    $("card-dialog").showModal();
    let resp;
    try {
      resp = await fetch("v1/models/card", { headers: headers({ Accept: "text/html" }) });
    } catch (err) {
      body.replaceChildren(el("p", "Could not reach the service: " + err.message));
      return;
    }
    if (!resp.ok) {
      const p = await readProblem(resp);
      body.replaceChildren(el("h3", p.title), el("p", p.detail));
      return;
    }
    const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
    const card = doc.getElementById("card");
    body.replaceChildren(...(card ? Array.from(card.childNodes, (n) => document.importNode(n, true)) : []));
  }

  // --- wiring ---------------------------------------------------------------------------------
  function init() {
    const drop = $("drop");
    $("file").addEventListener("change", (e) => {
      fromFiles(e.target.files, "chosen");
      e.target.value = ""; // the same file again is a new request
    });
    for (const type of ["dragenter", "dragover"]) {
      document.addEventListener(type, (e) => {
        e.preventDefault(); // else the browser opens the dropped file and the page is gone
        drop.classList.add("dragging");
      });
    }
    document.addEventListener("dragleave", (e) => {
      if (!e.relatedTarget) drop.classList.remove("dragging");
    });
    document.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("dragging");
      fromFiles(e.dataTransfer && e.dataTransfer.files, "dropped");
    });
    document.addEventListener("paste", (e) => {
      const files = e.clipboardData && e.clipboardData.files;
      if (files && files.length) {
        e.preventDefault();
        fromFiles(files, "pasted");
      }
    });
    $("heatmap-toggle").addEventListener("change", showCrop);
    $("card-link").addEventListener("click", openCard);
    $("card-close").addEventListener("click", () => $("card-dialog").close());
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      try {
        sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
      } catch {
        // storage off: the key cannot be kept
      }
      $("api-key").value = "";
      $("key-why").textContent = "Key stored for this tab.";
      loadModel();
    });
    $("key-forget").addEventListener("click", () => {
      try {
        sessionStorage.removeItem(KEY_STORE);
      } catch {
        // nothing stored
      }
      $("key-why").textContent = "Key forgotten.";
    });
    loadModel();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
