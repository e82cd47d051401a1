/* Playground page: chat with any model from /v1/models, streaming tokens as they come, with
   each answer's routing explanation under it. */
"use strict";

(function (m) {
  const { h, api } = m;

  // Server-sent events from /v1/chat/completions: call onChunk for each JSON chunk.
  async function readStream(res, onChunk) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") return;
          const chunk = JSON.parse(payload);
          if (chunk.error) throw new m.ApiError(chunk.error.code || 500, chunk.error.message);
          onChunk(chunk);
        }
      }
    }
  }

  async function answer(turn, request, stream) {
    const t0 = performance.now();
    let firstToken = null;
    let usage = null;
    const setRouting = (info) => turn.routing.replaceChildren(m.routing.render(info));
    if (!stream) {
      const body = await api("/v1/chat/completions", { method: "POST", json: request });
      turn.text.textContent = body.choices[0].message.content;
      turn.text.dataset.chunks = "1";
      usage = body.usage;
      setRouting(body.moerge);
    } else {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", headers: m.headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(Object.assign({}, request, { stream: true })),
      });
      if (!res.ok) throw await m.apiError(res);
      let chunks = 0;
      await readStream(res, (chunk) => {
        if (chunk.moerge) setRouting(chunk.moerge);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (firstToken === null) firstToken = performance.now() - t0;
          turn.text.textContent += delta.content;
          turn.text.dataset.chunks = String(++chunks);
        }
        if (chunk.usage) usage = chunk.usage;
      });
    }
    const ms = performance.now() - t0;
    turn.meta.textContent = [
      usage ? `${usage.completion_tokens} tokens` : null,
      `${(ms / 1000).toFixed(2)} s`,
      firstToken !== null ? `first token after ${(firstToken / 1000).toFixed(2)} s` : null,
      stream ? "streamed" : "not streamed",
    ].filter(Boolean).join(" · ");
    return turn.text.textContent;
  }

  async function render(root) {
    const history = [];
    const log = h("div", { id: "chat-log", class: "chat-log" });
    const model = h("select", { id: "chat-model", "aria-label": "model" });
    const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 1024, value: 48 });
    const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
    const stream = h("input", { id: "chat-stream", type: "checkbox", checked: true });
    const prompt = h("textarea", { id: "chat-prompt", rows: 3, placeholder: "Ask something…" });
    const send = h("button", { type: "submit", id: "chat-send" }, "Send");
    const status = h("div", { id: "chat-status" });
    const form = h("form", { id: "chat-form", class: "card" },
      h("div", { class: "row" },
        h("label", {}, "Model", model),
        h("label", {}, "Max tokens", maxTokens),
        h("label", {}, "Temperature", temperature),
        h("label", { class: "inline" }, stream, "Stream"),
        h("button", { type: "button", id: "chat-clear", class: "quiet", onclick: () => { history.length = 0; log.replaceChildren(); } },
          "Clear conversation")),
      prompt, h("div", { class: "row" }, send, status));
    m.append(root, [h("h1", {}, "Playground"),
      h("p", { class: "muted" }, "auto routes with the server's default method; moerge:<method> picks one; an expert name pins it."),
      log, form]);

    try {
      const models = await api("/v1/models");
      model.replaceChildren(...models.data.map((x) => h("option", { value: x.id }, x.id)));
    } catch (err) {
      status.replaceChildren(m.errorBox(err, "models-error"));
    }

    prompt.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) form.requestSubmit();
    });

    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const text = prompt.value.trim();
      if (!text) return;
      const turn = {
        text: h("div", { class: "answer", dataset: { chunks: "0" } }),
        meta: h("div", { class: "muted meta" }, "waiting…"),
        routing: h("div", { class: "routing-box" }),
      };
      const entry = h("div", { class: "turn", dataset: { model: model.value, state: "running" } },
        h("div", { class: "user-msg" }, h("span", { class: "who" }, "you → " + model.value), text),
        h("div", { class: "assistant-msg" }, turn.text, turn.meta, turn.routing));
      log.appendChild(entry);
      history.push({ role: "user", content: text });
      prompt.value = "";
      send.disabled = true;
      status.replaceChildren();
      const request = {
        model: model.value, messages: history.slice(),
        max_tokens: Number(maxTokens.value) || 48, temperature: Number(temperature.value) || 0,
      };
      try {
        history.push({ role: "assistant", content: await answer(turn, request, stream.checked) });
        entry.dataset.state = "done";
      } catch (err) {
        history.pop();
        turn.meta.replaceChildren(m.errorBox(err, null));
        entry.dataset.state = "failed";
      } finally {
        send.disabled = false;
        entry.scrollIntoView({ block: "end" });
      }
    });
  }

  m.pages.playground = { render };
})(window.moerge);
