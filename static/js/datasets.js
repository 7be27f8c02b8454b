// Dataset upload: drag and drop or choose a file, a progress bar while it streams to the server, and the server's
// line-numbered errors shown in the page when it refuses the file.
(function () {
  "use strict";
  const form = document.getElementById("upload-form");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
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

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const data = new FormData(form);
    if (dropped) data.set("file", dropped, dropped.name);
    const file = data.get("file");
    if (!file || !file.name) { $("upload-status").textContent = form.dataset.noFile || "?"; return; }
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.getAttribute("action"));
    const bar = $("upload-progress");
    bar.hidden = false;
    bar.value = 0;
    $("upload-errors").hidden = true;
    $("upload-submit").disabled = true;
    xhr.upload.addEventListener("progress", (ev) => {
      if (ev.lengthComputable) bar.value = ev.loaded / ev.total;
      $("upload-status").textContent = Math.round((100 * ev.loaded) / (ev.total || 1)) + " %";
    });
    xhr.addEventListener("load", () => {
      $("upload-submit").disabled = false;
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { body = { error: xhr.statusText }; }
      if (body.ok) { window.location = body.url; return; }
      $("upload-status").textContent = "";
      $("upload-error-text").textContent = body.error || xhr.statusText;
      const list = $("upload-error-list");
      list.replaceChildren();
      for (const [line, message] of (body.validation && body.validation.errors) || []) {
        const li = document.createElement("li");
        li.textContent = `${line}: ${message}`;  // text, never HTML
        list.appendChild(li);
      }
      $("upload-errors").hidden = false;
    });
    xhr.send(data);
  });
})();
