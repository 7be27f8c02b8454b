// Tokenizer page: the encoding playground (asks the server as you type), and a reload while it trains.
(function () {
  "use strict";
  const status = document.getElementById("tok-status");
  if (status && status.dataset.status === "training") setTimeout(() => window.location.reload(), 2000);
  const box = document.getElementById("playground-text");
  if (!box) return;
  const csrf = document.querySelector("[name=csrfmiddlewaretoken]").value;
  let timer = null;
  async function encode() {
    const r = await fetch(box.dataset.url, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify({ text: box.value }) });
    const body = await r.json();
    const out = document.getElementById("playground-tokens");
    out.replaceChildren();
    const fragments = new Set(body.fragments || []);  // tokens that hold part of a character: shown as bytes
    for (let i = 0; i < (body.ids || []).length; i++) {
      const span = document.createElement("span");
      span.className = fragments.has(i) ? "token bytes" : "token";
      span.title = String(body.ids[i]);
      span.textContent = body.pieces[i];  // text, never HTML
      out.appendChild(span);
    }
    const count = document.getElementById("playground-count");  // its words come in the page's language
    count.textContent = `${body.count} ${count.dataset.tokens} · ${body.characters} ${count.dataset.characters} · ` +
      `${count.dataset.ids}: ${(body.ids || []).join(" ")}`;
  }
  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(encode, 200); });
  encode();
})();
