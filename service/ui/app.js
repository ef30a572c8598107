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
  let heatSeq = 0; // the heatmap selector's requests, newest wins
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
    // for a clinician: which model, and what it tells apart; the engineering facts are under "Technical details"
    $("model-line").textContent =
      "Model " + modelInfo.name + " " + modelInfo.version + " · tells apart " + modelInfo.classes.length +
      " kinds of skin lesion";
  }

  // --- classify -------------------------------------------------------------------------------
  function clearResult() {
    shown = null;
    $("result").hidden = true;
    $("summary").textContent = "";
  }

  let lastFile = null; // the image on screen, sent again when another heatmap class is chosen
  let wholeUrl = null; // object URL of that image (JPEG/PNG), revoked when replaced

  async function classify(file, note) {
    lastFile = file;
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
  const nameOf = (answer, code) => (answer.predictions.find((p) => p.code === code) || { name: code }).name;

  function render(answer, file) {
    shown = answer;
    const top = answer.top;
    const m = answer.malignancy;
    const ood = answer.ood || { available: false };
    const flagged = ood.available && ood.out_of_distribution;
    const above = m.above_threshold;

    // --- plain words first --------------------------------------------------------------------
    $("top-name").textContent = top.name;
    $("top-pct").textContent = "(" + pct(top.probability) + ")";
    const second = answer.predictions[1];
    $("runner-up").textContent = second ? "then " + second.name + " (" + pct(second.probability) + ")" : "";

    const malignant = answer.predictions.filter((p) => m.classes.includes(p.code));
    const parts = malignant.map((p) => p.name + " " + pct(p.probability)).join(" + ");
    const verdict = $("malignancy-verdict");
    verdict.className = "verdict " + (above ? "above" : "below");
    verdict.replaceChildren(
      el("span", above ? "▲ " : "▼ ", "icon"),
      el("strong", above ? "raised: look closer" : "not raised"),
    );
    verdict.firstChild.setAttribute("aria-hidden", "true");
    const topIsMalignant = m.classes.includes(top.code);
    let why =
      "The " + malignant.length + " malignant classes together: " + parts + " = " + pct(m.score) + ", " +
      (above ? "at or above" : "below") + " the threshold of " + pct(m.threshold) + ".";
    if (above && !topIsMalignant) {
      why += " The flag is raised although the most likely class is benign: the malignant classes add up, and the " +
        "threshold is set low on purpose so that few malignant lesions are missed.";
    } else if (!above && topIsMalignant) {
      why += " The most likely class is malignant but the flag is not raised: read both.";
    }
    $("malignancy-reason").textContent = why;

    const oodVerdict = $("ood-verdict");
    if (!ood.available) {
      oodVerdict.className = "verdict";
      oodVerdict.textContent = "not checked";
      $("ood-reason").textContent = "This model has no check of whether an image resembles its training images.";
    } else {
      oodVerdict.className = "verdict " + (flagged ? "above" : "below");
      oodVerdict.replaceChildren(el("span", flagged ? "⚠ " : "✓ ", "icon"), el("strong", flagged ? "no" : "yes"));
      oodVerdict.firstChild.setAttribute("aria-hidden", "true");
      $("ood-reason").textContent = flagged
        ? (top.warning || "This image looks unlike the dermoscopic images the model was trained on.") +
          " Do not rely on the classification above."
        : "The image resembles the dermoscopic images the model was trained on.";
    }
    $("ood-line").classList.toggle("warn", Boolean(flagged));

    // --- the whole image with the model's crop drawn on it, and what the model saw --------------------
    const img = answer.image;
    const ex = answer.explanation || {};
    const viewable = /^image\/(jpeg|png)$/.test(file.type || "") || img.format === "jpeg" || img.format === "png";
    if (wholeUrl) URL.revokeObjectURL(wholeUrl);
    wholeUrl = viewable ? URL.createObjectURL(file) : null;
    $("whole-figure").hidden = !wholeUrl;
    if (wholeUrl) {
      $("whole").src = wholeUrl;
      $("whole").alt = "The whole uploaded image, " + img.width + " × " + img.height + " px, with the square the model saw outlined";
      // the service crops the centre square of the image as displayed (EXIF orientation applied), then resizes it
      const side = Math.min(img.width, img.height);
      const box = $("crop-box");
      box.style.left = ((img.width - side) / 2 / img.width) * 100 + "%";
      box.style.top = ((img.height - side) / 2 / img.height) * 100 + "%";
      box.style.width = (side / img.width) * 100 + "%";
      box.style.height = (side / img.height) * 100 + "%";
      const cut = side < Math.max(img.width, img.height);
      $("whole-caption").textContent = cut
        ? "The whole image; the model saw only the outlined centre square. Anything outside it was not looked at."
        : "The whole image; the model saw all of it (it is square).";
    } else {
      $("whole-caption").textContent = "";
    }

    const crop = $("crop");
    crop.hidden = !ex.input_png_base64;
    $("heatmap-toggle").disabled = !ex.available;
    const select = $("heatmap-class");
    select.replaceChildren(...answer.predictions.map((p) => {
      const o = el("option", p.name + " (" + pct(p.probability) + ")");
      o.value = p.code;
      return o;
    }));
    select.value = ex.class || top.code;
    select.disabled = !ex.available;
    $("heatmap-note").textContent = ex.available ? "" : ex.detail || "No heatmap in this answer.";
    showCrop();
    $("crop-caption").textContent = !ex.width
      ? "The service returned no model-input image."
      : wholeUrl
        ? "The outlined square, resized to " + ex.width + " × " + ex.height + " px: what the model looked at."
        : "The centre square of the " + img.width + " × " + img.height + " px image (a browser cannot show a DICOM " +
          "file whole), resized to " + ex.width + " × " + ex.height + " px: what the model looked at." +
          (img.width !== img.height ? " The rest of the image was not looked at." : "");

    // --- the score against its threshold: words and an arrow, not colour alone -----------------------
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
    $("malignancy-classes").textContent =
      "Score = sum of the probabilities of the malignant classes: " + malignant.map((p) => p.name).join(", ") + ".";

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

    // --- technical details, folded ----------------------------------------------------------------
    fillList($("model-details"), [
      ["Name", answer.model.name],
      ["Version", answer.model.version],
      ["sha256", answer.model.sha256, true],
      ["Precision", answer.model.precision],
      ["Execution provider", modelInfo && modelInfo.provider],
      ["Input size", modelInfo && modelInfo.input_size + " px"],
      ["Service version", answer.service_version],
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
      ["Image", img.width + " × " + img.height + " px, " + img.format],
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
      "Result: most likely " + top.name + ", " + pct(top.probability) + ". Malignancy flag " +
      (above ? "raised" : "not raised") + ": score " + pct(m.score, 2) + (above ? ", above" : ", below") +
      " the threshold " + pct(m.threshold, 2) + "." +
      (flagged ? " Warning: the image looks unlike the training data." : "");
  }

  function showCrop() {
    if (!shown) return;
    const ex = shown.explanation || {};
    const heat = $("heatmap-toggle").checked && ex.available;
    const crop = $("crop");
    const b64 = heat ? ex.png_base64 : ex.input_png_base64;
    if (b64) crop.src = "data:image/png;base64," + b64;
    const explained = ex.class ? nameOf(shown, ex.class) : "";
    $("heatmap-legend").hidden = !heat;
    $("heatmap-explains").textContent = heat ? "Where the model found evidence for: " + explained + "." : "";
    crop.alt = heat
      ? "What the model saw, with the heatmap of its evidence for " + explained + " over it (red: strongest)"
      : "What the model saw: the centre square of the image, resized";
  }

  // Another class in the selector: the same image again with explain_class, and only its heatmap replaced.
  async function explainClass() {
    const code = $("heatmap-class").value;
    if (!shown || !lastFile || !code || (shown.explanation || {}).class === code) return;
    const mine = ++heatSeq;
    const forAnswer = shown; // a new image meanwhile replaces `shown`: this heatmap is then dropped
    $("heatmap-note").textContent = "Drawing the heatmap of " + nameOf(shown, code) + "…";
    const form = new FormData();
    form.append("image", lastFile, lastFile.name || "pasted-image");
    try {
      const resp = await fetch("v1/classify?explain_class=" + encodeURIComponent(code), {
        method: "POST", body: form, headers: headers({ Accept: "application/json" }),
      });
      if (mine !== heatSeq || shown !== forAnswer) return;
      if (!resp.ok) {
        const p = await readProblem(resp);
        $("heatmap-note").textContent = "No heatmap: " + p.title + ". " + p.detail;
        return;
      }
      const again = await resp.json();
      if (mine !== heatSeq || shown !== forAnswer) return;
      shown.explanation = again.explanation;
      $("heatmap-note").textContent = "";
      $("heatmap-toggle").checked = true;
      showCrop();
    } catch (err) {
      if (mine === heatSeq && shown === forAnswer) $("heatmap-note").textContent = "No heatmap: " + String(err.message || err);
    }
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
    $("heatmap-class").addEventListener("change", explainClass);
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
