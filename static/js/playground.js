// Playground: multi-turn chat with one model or two side by side, streamed from /v1/chat/completions (SSE).
(function () {
  "use strict";
  const root = document.getElementById("playground");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const text = JSON.parse($("pg-text").textContent);
  const csrf = root.querySelector("[name=csrfmiddlewaretoken]").value;
  const columns = { a: { chat: $("pg-chat-a"), history: [] }, b: { chat: $("pg-chat-b"), history: [] } };
  let controllers = [];

  function bubble(col, role, label) {
    const div = document.createElement("div");
    div.className = `bubble role-${role}`;
    const tag = document.createElement("span");
    tag.className = "role";
    tag.textContent = label;
    div.appendChild(tag);
    col.chat.appendChild(div);
    return div;
  }

  function modelName(select) { return select.options[select.selectedIndex].textContent; }

  async function ask(key, modelId, label) {
    const col = columns[key];
    const out = bubble(col, "assistant", label);
    out.classList.add("pending");
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = text.reasoning;
    const reasoning = document.createElement("div");
    reasoning.className = "reasoning";
    details.append(summary, reasoning);
    details.hidden = true;
    const answer = document.createElement("div");
    answer.className = "answer";
    const waiting = document.createElement("div");
    waiting.className = "waiting";
    waiting.hidden = true;
    out.append(waiting, details, answer);
    const messages = [];
    const system = $("pg-system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const controller = new AbortController();
    controllers.push(controller);
    const body = { model: String(modelId), messages: messages.concat(col.history), stream: true,
      temperature: Number($("pg-temperature").value), top_p: Number($("pg-top-p").value),
      max_tokens: Number($("pg-max-tokens").value), enable_thinking: $("pg-thinking").checked };
    const seed = $("pg-seed").value.trim();
    if (seed !== "") body.seed = Number(seed);
    let content = "", failed = false;
    try {
      const r = await fetch(root.dataset.url, { method: "POST", credentials: "same-origin", signal: controller.signal,
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf }, body: JSON.stringify(body) });
      if (!r.ok) {
        const err = await r.json().catch(() => ({}));
        throw new Error((err.error && err.error.message) || r.statusText);
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 2);
          const queued = /^: queued (\d+)$/.exec(line);  // other users' chats go first (fair turns)
          if (queued) { waiting.textContent = text.waiting.replace("%(n)s", queued[1]); waiting.hidden = false; }
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          waiting.hidden = true;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = (chunk.choices[0] || {}).delta || {};
          if (delta.reasoning_content) { details.hidden = false; reasoning.textContent += delta.reasoning_content; }
          if (delta.content) { content += delta.content; answer.textContent = content; }
          if (chunk.usage) out.title = `${chunk.usage.completion_tokens} ${text.tokens}`;
        }
      }
    } catch (err) {
      failed = true;
      if (err.name !== "AbortError") {
        const e = document.createElement("div");
        e.className = "error";
        e.textContent = `${text.error}: ${err.message}`;
        out.appendChild(e);
      }
    } finally {
      if (!failed && !content.trim() && !reasoning.textContent.trim()) {
        const e = document.createElement("div");
        e.className = "hint";
        e.textContent = text.empty;
        out.appendChild(e);
      }
      out.classList.remove("pending");
      out.classList.add("done");
    }
    col.history.push({ role: "assistant", content: content });
  }

  $("pg-model-b").addEventListener("change", () => { columns.b.chat.hidden = !$("pg-model-b").value; });
  $("pg-clear").addEventListener("click", () => {
    for (const col of Object.values(columns)) { col.history = []; col.chat.replaceChildren(); }
  });
  $("pg-stop").addEventListener("click", () => controllers.forEach((c) => c.abort()));
  $("pg-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const prompt = $("pg-input").value.trim();
    if (!prompt) return;
    $("pg-input").value = "";
    $("pg-send").disabled = true;
    $("pg-stop").disabled = false;
    controllers = [];
    const runs = [];
    const pairs = [["a", $("pg-model-a")], ["b", $("pg-model-b")]].filter(([, s]) => s.value);
    for (const [key, select] of pairs) {
      const col = columns[key];
      bubble(col, "user", text.you).appendChild(document.createTextNode(prompt));
      col.history.push({ role: "user", content: prompt });
      runs.push(ask(key, select.value, modelName(select)));
    }
    await Promise.all(runs);
    $("pg-send").disabled = false;
    $("pg-stop").disabled = true;
  });
})();
