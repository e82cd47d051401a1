/* How one answer was routed: the `moerge` object every answer carries, drawn as the chosen
   experts with their scores, abstain, GLIDER's instruction, and for token-level methods a
   heatmap of each expert's share of routing mass per layer. */
"use strict";

(function (m) {
  const { h, fmt } = m;
  const TOP_EXPERTS = 8;

  function head(info) {
    const bits = [
      h("span", { class: "route-method" }, info.method),
      h("span", { class: "muted" }, `${info.granularity} routing`),
      h("span", { class: "muted" }, `${fmt.num(info.routing_ms, 1)} ms`),
    ];
    if (info.abstain) {
      const why = info.method === "base" ? "base model, no routing" : "abstained: the base model answered";
      bits.push(h("span", { class: "badge warn route-abstain" }, why));
    }
    return h("div", { class: "route-head" }, bits);
  }

  function expertsTable(info) {
    if (!info.experts || !info.experts.length) return null;
    const chosen = new Set(info.chosen || []);
    // Token-level routers without a request-level score list their experts at 0: the per-token
    // gates decide, and the heatmap shows how.
    const scored = info.experts.some((e) => e.score !== 0);
    const top = Math.max(...info.experts.map((e) => Math.abs(e.score)), 1e-9);
    const picked = info.granularity === "token" ? "in the mixture" : "chosen";
    const rows = info.experts.slice(0, TOP_EXPERTS).map((e) => {
      const isChosen = chosen.has(e.name) && !info.abstain;
      return h("tr", { class: isChosen ? "chosen" : null, dataset: { expert: e.name } },
        h("td", {}, e.name),
        h("td", { class: "num" }, scored ? fmt.num(e.score, 4) : "–"),
        h("td", { class: "bar-cell" }, scored ? h("span", { class: "bar", style: { width: `${(100 * Math.abs(e.score)) / top}%` } }) : null),
        h("td", {}, isChosen ? picked : ""),
      );
    });
    const more = info.experts.length - TOP_EXPERTS;
    return h("table", { class: "route-experts" },
      h("thead", {}, h("tr", {}, h("th", {}, "expert"), h("th", {}, scored ? "score" : "score (per token)"), h("th", {}, ""), h("th", {}, ""))),
      h("tbody", {}, rows),
      more > 0 ? h("tfoot", {}, h("tr", {}, h("td", { colspan: 4, class: "muted" }, `and ${more} more`))) : null,
    );
  }

  // layer_usage: {layer: {expert: share}} → one row per expert, one column per layer.
  function heatmap(usage) {
    const layers = Object.keys(usage).map(Number).sort((a, b) => a - b);
    const experts = [...new Set(layers.flatMap((l) => Object.keys(usage[String(l)])))].sort();
    const mean = (e) => layers.reduce((s, l) => s + (usage[String(l)][e] || 0), 0) / layers.length;
    experts.sort((a, b) => mean(b) - mean(a));
    const header = h("tr", {}, h("th", {}, "expert \\ layer"), layers.map((l) => h("th", { class: "layer" }, String(l))),
      h("th", {}, "mean"));
    const rows = experts.map((e) => h("tr", { dataset: { expert: e } },
      h("th", { class: "row-name" }, e),
      layers.map((l) => {
        const share = usage[String(l)][e] || 0;
        return h("td", {
          class: "heat", title: `layer ${l} · ${e}: ${fmt.pct(share)}%`,
          style: { backgroundColor: `rgba(29, 78, 216, ${share.toFixed(3)})` },
        });
      }),
      h("td", { class: "num" }, `${fmt.pct(mean(e))}%`),
    ));
    return h("div", { class: "heatmap-wrap" },
      h("p", { class: "muted" }, "Share of routing mass per layer (white 0% → blue 100%)"),
      h("table", { class: "heatmap" }, h("thead", {}, header), h("tbody", {}, rows)));
  }

  function render(info) {
    const box = h("div", { class: "routing", dataset: { method: info.method } }, head(info));
    if (info.instruction) {
      box.appendChild(h("p", { class: "instruction" }, h("b", {}, "GLIDER's instruction: "),
        h("q", { class: "instruction-text" }, info.instruction)));
    }
    box.appendChild(expertsTable(info) || h("p", { class: "muted" }, "No expert scores."));
    if (info.bias && Object.keys(info.bias).length) {
      box.appendChild(h("p", { class: "muted" }, "Per-request gate bias: ",
        Object.entries(info.bias).map(([e, b]) => `${e} ${fmt.num(b, 2)}`).join(", ")));
    }
    if (info.plan) {
      const gating = info.gating ? ` · gates ${info.gating.gate_set}, ${info.gating.mode}, top-${info.gating.top_k}, temperature ${info.gating.temperature}` : "";
      box.appendChild(h("p", { class: "muted run-on" }, `Plan: ${info.plan.replace(/_/g, " ")}, run on the ${info.engine} engine${gating}.`));
    }
    if (info.fallback) box.appendChild(h("p", { class: "notice" }, `Fallback: ${typeof info.fallback === "string" ? info.fallback : JSON.stringify(info.fallback)}`));
    if (info.detail && Object.keys(info.detail).length) {
      box.appendChild(h("details", {}, h("summary", {}, "router detail"), h("code", { class: "json" }, JSON.stringify(info.detail, null, 1))));
    }
    if (info.notes && info.notes.length) box.appendChild(h("ul", { class: "notes" }, info.notes.map((n) => h("li", {}, n))));
    if (info.layer_usage && Object.keys(info.layer_usage).length) box.appendChild(heatmap(info.layer_usage));
    else if (info.granularity === "token") box.appendChild(h("p", { class: "muted pending-usage" }, "Per-layer usage arrives with the last token."));
    return box;
  }

  m.routing = { render };
})(window.moerge);
