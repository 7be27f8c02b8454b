// Dataset upload: drag and drop or choose a file; it is sent in 8 MB chunks (resumable: after a network error the
// upload continues from the bytes the server has) with a progress bar, then checked by the server (a large file in
// the background, its progress followed here), whose line-numbered errors are shown in the page when it refuses it.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const CHUNK = 8 * 1024 * 1024;
  const csrf = form.querySelector("[name=csrfmiddlewaretoken]").value;
  const zone = $("drop-zone"), input = $("upload-file");
  let dropped = null;

  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) {
      dropped = e.dataTransfer.files[0];
      $("upload-status").textContent = dropped.name;
    }
  });
  input.addEventListener("change", () => { dropped = null; });

  async function api(method, url, body, type) {
    const headers = { "X-CSRFToken": csrf };
    if (type) headers["Content-Type"] = type;
    const r = await fetch(url, { method, body, headers, credentials: "same-origin" });
    let json = {};
    try { json = await r.json(); } catch (err) { json = { error: r.statusText }; }
    return { status: r.status, json };
  }

  function showErrors(body) {
    $("upload-status").textContent = "";
    $("upload-error-text").textContent = body.error || "?";
    const list = $("upload-error-list");
    list.replaceChildren();
    const validation = (body.details && body.details.validation) || {};
    for (const [line, message] of validation.errors || []) {
      const li = document.createElement("li");
      li.textContent = `${line}: ${message}`;  // text, never HTML
      list.appendChild(li);
    }
    $("upload-errors").hidden = false;
  }

  async function send(file) {
    const bar = $("upload-progress");
    bar.hidden = false;
    bar.value = 0;
    const start = await api("POST", "/api/v1/uploads");
    if (start.status !== 201) return showErrors(start.json);
    const id = start.json.id;
    let offset = 0, failures = 0;
    while (offset < file.size) {
      const chunk = file.slice(offset, offset + CHUNK);
      let r;
      try {
        r = await api("PUT", `/api/v1/uploads/${id}?offset=${offset}`, chunk, "application/octet-stream");
      } catch (err) {
        r = { status: 0, json: {} };
      }
      if (r.status === 200) {
        offset = r.json.offset;
        failures = 0;
      } else if ((r.status === 0 || r.status === 409) && failures < 5) {
        failures += 1;  // resume from what the server holds
        const at = await api("GET", `/api/v1/uploads/${id}`);
        offset = at.json.offset || 0;
      } else {
        return showErrors(r.json);
      }
      bar.value = offset / file.size;
      $("upload-status").textContent = Math.round((100 * offset) / file.size) + " %";
    }
    $("upload-status").textContent = form.dataset.checking || "…";
    const data = new FormData();
    data.set("name", $("upload-name").value || file.name.replace(/\.gz$/, "").replace(/\.jsonl$/, ""));
    data.set("kind", $("upload-kind").value);
    data.set("upload", id);
    await finish(data);
  }

  async function finish(data) {
    // POST /datasets; a large file is checked in the background (202): follow its progress, then its dataset or
    // its refusal
    const bar = $("upload-progress");
    bar.hidden = false;
    bar.value = 0;
    let done = await api("POST", "/api/v1/datasets", data);
    const id = done.json.id;
    while (done.status === 202 || (done.status === 200 && done.json.status === "checking")) {
      bar.value = done.json.progress || 0;
      $("upload-status").textContent = done.json.waiting ? form.dataset.waiting || "…"
        : `${form.dataset.checking || "…"} ${Math.round(100 * bar.value)} %`;
      await new Promise((resolve) => setTimeout(resolve, 1000));
      try { done = await api("GET", `/api/v1/uploads/${id}`); } catch (err) { /* a network error: ask again */ }
    }
    if (done.status === 201) window.location = `/datasets/${done.json.id}/`;
    else if (done.status === 200 && done.json.dataset) window.location = `/datasets/${done.json.dataset.id}/`;
    else showErrors(done.json);
  }

  async function importFromServer(serverPath) {  // admins: a file already on the server
    const data = new FormData();
    data.set("name", $("upload-name").value || serverPath.split("/").pop().replace(/\.gz$/, "").replace(/\.jsonl$/, ""));
    data.set("kind", $("upload-kind").value);
    data.set("server_path", serverPath);
    $("upload-status").textContent = form.dataset.checking || "…";
    await finish(data);
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const serverPath = $("upload-server-path") ? $("upload-server-path").value.trim() : "";
    if (serverPath) {
      $("upload-errors").hidden = true;
      await importFromServer(serverPath);
      return;
    }
    const file = dropped || input.files[0];
    if (!file) { $("upload-status").textContent = form.dataset.noFile; return; }
    $("upload-errors").hidden = true;
    $("upload-submit").disabled = true;
    try { await send(file); } finally { $("upload-submit").disabled = false; }
  });
})();
