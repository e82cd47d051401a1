/* Pool page: every expert's kind, card, size, rank and usage; register a LoRA by upload and
   remove one. Both changes need the admin key; without it the controls stay disabled and the
   API's own refusal is shown. */
"use strict";

(function (m) {
  const { h, api, fmt } = m;

  function lines(text) { return text.split("\n").map((s) => s.trim()).filter(Boolean); }

  function cardCell(e) {
    return h("td", { class: "card-cell" },
      h("div", {}, e.description || h("span", { class: "muted" }, "no description")),
      e.kind === "model" && e.model ? h("div", { class: "muted" }, `${e.model}${e.api_base ? " @ " + e.api_base : ""}`) : null,
      e.tags.length ? h("div", {}, e.tags.map((t) => h("span", { class: "chip" }, t))) : null,
      e.examples.length ? h("details", {}, h("summary", {}, `${e.examples.length} example prompt(s)`),
        h("ul", {}, e.examples.map((x) => h("li", {}, x)))) : null,
    );
  }

  function removeButton(e, ctx, onRemoved, report) {
    const btn = h("button", {
      type: "button", class: "danger remove", dataset: { expert: e.name },
      disabled: !ctx.access.admin, title: ctx.access.admin ? `remove ${e.name}` : ctx.access.admin_error,
    }, "Remove");
    let armed = null;
    btn.addEventListener("click", async () => {
      // Two clicks: the first arms the button, so a stray click never removes an expert.
      if (!armed) {
        btn.textContent = "Confirm removal";
        btn.classList.add("armed");
        armed = setTimeout(() => { armed = null; btn.textContent = "Remove"; btn.classList.remove("armed"); }, 5000);
        return;
      }
      clearTimeout(armed);
      btn.disabled = true;
      try {
        await api(`/v1/experts/${encodeURIComponent(e.name)}`, { method: "DELETE" });
        report(h("p", { class: "ok", id: "pool-message" }, `removed ${e.name}`));
        onRemoved();
      } catch (err) {
        report(m.errorBox(err, "pool-message"));
        btn.disabled = false;
      }
      armed = null;
    });
    return btn;
  }

  function poolTable(data, ctx, reload, report) {
    if (!data.data.length) return h("p", { class: "muted", id: "pool-empty" }, "The pool is empty.");
    const rows = data.data.map((e) => h("tr", { dataset: { expert: e.name } },
      h("td", { class: "name" }, e.name),
      h("td", {}, e.kind),
      h("td", { class: "num" }, e.rank === null ? "–" : String(e.rank)),
      h("td", { class: "num size" }, fmt.bytes(e.size_bytes)),
      h("td", { class: "num requests" }, String(e.requests)),
      h("td", {}, [e.has_gate ? "gate" : null, e.has_arrow ? "arrow" : null].filter(Boolean).join(", ") || "–"),
      cardCell(e),
      h("td", {}, removeButton(e, ctx, reload, report)),
    ));
    return h("table", { class: "grid", id: "pool-table" },
      h("thead", {}, h("tr", {}, ["name", "kind", "rank", "size", "requests", "routing data", "card", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows));
  }

  function uploadForm(ctx, reload) {
    const result = h("div", { id: "upload-result" });
    const files = h("input", { type: "file", name: "files", id: "upload-files", multiple: true, required: true });
    const form = h("form", { id: "upload-form", class: "card" },
      h("fieldset", { disabled: !ctx.access.admin },
        h("legend", {}, "Register a LoRA expert"),
        h("label", {}, "Name", h("input", { name: "name", id: "upload-name", required: true, placeholder: "e.g. pirate_speak" })),
        h("label", {}, "Description (the card text routing reads)",
          h("textarea", { name: "description", id: "upload-description", rows: 2 })),
        h("label", {}, "Example prompts, one per line", h("textarea", { name: "examples", id: "upload-examples", rows: 2 })),
        h("label", {}, "Tags, comma-separated", h("input", { name: "tags", id: "upload-tags" })),
        h("label", {}, "adapter_config.json + adapter_model.safetensors, or one .tar.gz", files),
        h("button", { type: "submit", id: "upload-submit" }, "Register"),
      ),
      result,
    );
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const f = form.elements;
      const body = new FormData();
      body.append("name", f.name.value.trim());
      body.append("description", f.description.value.trim());
      body.append("examples", JSON.stringify(lines(f.examples.value)));
      body.append("tags", JSON.stringify(f.tags.value.split(",").map((s) => s.trim()).filter(Boolean)));
      for (const file of files.files) body.append("files", file, file.name);
      const button = document.getElementById("upload-submit");
      button.disabled = true;
      result.replaceChildren(h("p", { class: "muted" }, "Validating and registering…"));
      try {
        const card = await api("/v1/experts", { method: "POST", body });
        result.replaceChildren(h("p", { class: "ok", id: "upload-ok" },
          `registered ${card.name} (${card.kind}, rank ${card.rank})`));
        form.reset();
        reload();
      } catch (err) {
        result.replaceChildren(m.errorBox(err, "upload-error"));
      } finally {
        button.disabled = false;
      }
    });
    return form;
  }

  async function render(root, ctx) {
    const tableBox = h("div", { id: "pool-box" });
    const messages = h("div", { id: "pool-messages" });
    const report = (el) => messages.replaceChildren(el);
    async function reload() {
      try {
        const data = await api("/v1/pool");
        tableBox.replaceChildren(poolTable(data, ctx, reload, report),
          h("p", { class: "muted" }, `${data.data.length} experts · requests since start; ${data.base_requests} went to the base model`));
      } catch (err) {
        tableBox.replaceChildren(m.errorBox(err, "pool-error"));
      }
    }
    m.append(root, [
      h("h1", {}, "Pool"),
      ctx.access.admin ? null : h("p", { class: "notice", id: "admin-refusal" },
        h("b", {}, "Read only. "), "This key can see the pool but not change it. The API says: ",
        h("q", {}, ctx.access.admin_error)),
      messages, tableBox, uploadForm(ctx, reload),
    ]);
    await reload();
  }

  m.pages.pool = { render };
})(window.moerge);
