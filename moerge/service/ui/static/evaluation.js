/* Evaluation page: the reports found in the server's reports folders, one report's tables and
   plots, and a comparison of two reports. */
"use strict";

(function (m) {
  const { h, api, fmt } = m;
  const LABELS = {
    held_in: "held-in", held_out: "held-out", routing_top1_held_in: "routing top-1 (held-in)",
    ood_abstain: "OOD abstain", routing_ms_p50: "routing ms (p50)", tokens_per_second: "tokens/s",
  };
  const PERCENT = new Set(["held_in", "held_out", "routing_top1_held_in", "ood_abstain"]);
  const LOWER_IS_BETTER = new Set(["routing_ms_p50"]);

  const cell = (col, v) => (PERCENT.has(col) ? fmt.pct(v) : fmt.num(v, 1));
  const reportPath = (id) => id.split("/").map(encodeURIComponent).join("/");

  function summaryTable(s) {
    return h("table", { class: "grid", id: "report-summary" },
      h("thead", {}, h("tr", {}, h("th", {}, "method"), s.columns.map((c) => h("th", {}, LABELS[c] || c)), h("th", {}, "engine"))),
      h("tbody", {}, s.rows.map((r) => h("tr", { dataset: { method: r.method } },
        h("td", {}, r.method), s.columns.map((c) => h("td", { class: "num" }, cell(c, r[c]))),
        h("td", {}, r.engines.join("+") || "–")))));
  }

  function perTaskTable(s) {
    const tasks = s.per_task.tasks;
    return h("details", {}, h("summary", {}, `Accuracy per task (%), ${tasks.length} tasks`),
      h("div", { class: "scroll" }, h("table", { class: "grid small" },
        h("thead", {}, h("tr", {}, h("th", {}, "method"), tasks.map((t) => h("th", {}, t)))),
        h("tbody", {}, s.per_task.rows.map((r) => h("tr", {}, h("td", {}, r.method),
          tasks.map((t) => h("td", { class: "num" }, fmt.pct(r.accuracy[t])))))))));
  }

  async function plots(s, box) {
    for (const name of s.plots) {
      const figure = h("figure", {}, h("figcaption", {}, name));
      box.appendChild(figure);
      try {
        // <img src> cannot send the key, so fetch the PNG with it and show the blob.
        const res = await api(`/v1/reports/${reportPath(s.id)}/plots/${encodeURIComponent(name)}`);
        const img = h("img", { alt: name, class: "plot", src: URL.createObjectURL(await res.blob()) });
        figure.insertBefore(img, figure.firstChild);
      } catch (err) {
        figure.appendChild(m.errorBox(err, null));
      }
    }
  }

  async function showReport(id, box) {
    box.replaceChildren(h("p", { class: "muted" }, "Loading report…"));
    let s;
    try {
      s = await api(`/v1/reports/${reportPath(id)}`);
    } catch (err) {
      box.replaceChildren(m.errorBox(err, "report-error"));
      return;
    }
    const cost = s.cost || {};
    const plotBox = h("div", { class: "plots", id: "report-plots" });
    box.replaceChildren(
      h("h2", {}, `Report ${s.id}`),
      h("p", { class: "muted" }, [
        `written ${fmt.date(s.modified)}`, s.config.n ? `n = ${s.config.n} per task` : null,
        s.config.eval_seed ? `seed ${s.config.eval_seed}` : null,
        s.config.experts ? `${s.config.experts.length} experts` : null,
        cost.wall_seconds ? `wall ${fmt.duration(cost.wall_seconds)}` : null,
        cost.peak_rss_mb ? `peak RSS ${fmt.num(cost.peak_rss_mb, 0)} MB` : null,
      ].filter(Boolean).join(" · ")),
      h("p", { class: "muted" }, "Accuracy and rates in %."),
      summaryTable(s),
      s.aims.length ? h("div", {}, h("h3", {}, "Aims"), h("ul", { class: "aims" }, s.aims.map((a) =>
        h("li", { class: /: met\)/.test(a) ? "met" : (/missed\)/.test(a) ? "missed" : null) }, a)))) : null,
      perTaskTable(s),
      s.best_single.length ? h("details", {}, h("summary", {}, "Best single expert per held-out task"),
        h("table", { class: "grid small" }, h("tbody", {}, s.best_single.map((b) =>
          h("tr", {}, h("td", {}, b.task), h("td", {}, b.expert || "–"), h("td", { class: "num" }, fmt.pct(b.accuracy))))))) : null,
      h("h3", {}, "Plots"), s.plots.length ? plotBox : h("p", { class: "muted" }, "This report has no plots."),
    );
    await plots(s, plotBox);
  }

  function deltaCell(col, d) {
    const v = d.delta;
    if (v === null || v === undefined) return h("td", { class: "num" }, `${cell(col, d.a)} → ${cell(col, d.b)}`);
    const better = LOWER_IS_BETTER.has(col) ? v < 0 : v > 0;
    const shown = PERCENT.has(col) ? (100 * v).toFixed(1) : v.toFixed(1);
    return h("td", { class: "num" }, `${cell(col, d.a)} → ${cell(col, d.b)} `,
      h("span", { class: v === 0 ? "delta" : (better ? "delta up" : "delta down") }, `(${v > 0 ? "+" : ""}${shown})`));
  }

  async function showComparison(a, b, box) {
    box.replaceChildren(h("p", { class: "muted" }, "Comparing…"));
    try {
      const c = await api(`/v1/reports/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
      const diffs = Object.entries(c.config_diff);
      box.replaceChildren(
        h("h2", {}, `${c.b.id} against ${c.a.id}`),
        h("p", { class: "muted" }, "Each cell: A → B (B − A). Accuracies and rates in %."),
        h("table", { class: "grid", id: "compare-table" },
          h("thead", {}, h("tr", {}, h("th", {}, "method"), h("th", {}, "in"), c.columns.map((col) => h("th", {}, LABELS[col] || col)))),
          h("tbody", {}, c.rows.map((r) => h("tr", { dataset: { method: r.method } },
            h("td", {}, r.method), h("td", {}, r.in), c.columns.map((col) => deltaCell(col, r[col])))))),
        diffs.length ? h("div", {}, h("h3", {}, "Settings that differ"), h("ul", {}, diffs.map(([k, v]) =>
          h("li", {}, `${k}: ${JSON.stringify(v.a)} → ${JSON.stringify(v.b)}`)))) : h("p", { class: "muted" }, "Same settings (n, seed, tasks, experts)."),
      );
    } catch (err) {
      box.replaceChildren(m.errorBox(err, "compare-error"));
    }
  }

  async function render(root) {
    root.appendChild(h("h1", {}, "Evaluation"));
    let list;
    try {
      list = await api("/v1/reports");
    } catch (err) {
      root.appendChild(m.errorBox(err, "reports-error"));
      return;
    }
    if (!list.data.length) {
      root.appendChild(h("p", { class: "notice", id: "no-reports" },
        `No report.json in ${list.folders.join(", ")} (or one level below). Run \`moerge eval --out runs/eval\`.`));
      return;
    }
    const options = () => list.data.map((r) => h("option", { value: r.id }, `${r.id} — ${fmt.date(r.modified)}`));
    const pick = h("select", { id: "report-pick", "aria-label": "report" }, options());
    const pickA = h("select", { id: "compare-a", "aria-label": "report A" }, options());
    const pickB = h("select", { id: "compare-b", "aria-label": "report B" }, options());
    if (list.data.length > 1) pickA.value = list.data[1].id;   // newest against the one before it
    const reportBox = h("section", { id: "report-view" });
    const compareBox = h("section", { id: "compare-view" });
    m.append(root, [
      h("table", { class: "grid", id: "reports-list" },
        h("thead", {}, h("tr", {}, ["report", "written", "n", "methods", "tasks", "wall"].map((c) => h("th", {}, c)))),
        h("tbody", {}, list.data.map((r) => h("tr", { dataset: { report: r.id } },
          h("td", {}, r.id), h("td", {}, fmt.date(r.modified)),
          r.error ? h("td", { colspan: 4, class: "error" }, r.error)
            : [h("td", { class: "num" }, String(r.n ?? "–")), h("td", { class: "num" }, String(r.methods)),
              h("td", { class: "num" }, String(r.tasks)), h("td", { class: "num" }, fmt.duration(r.wall_seconds))])))),
      h("p", { class: "muted" }, `Folders: ${list.folders.join(", ")}`),
      h("div", { class: "row card" }, h("label", {}, "Show report", pick)),
      reportBox,
      h("form", { class: "row card", id: "compare-form" },
        h("label", {}, "Compare A", pickA), h("label", {}, "with B", pickB),
        h("button", { type: "submit", id: "compare-go" }, "Compare")),
      compareBox,
    ]);
    pick.addEventListener("change", () => showReport(pick.value, reportBox));
    document.getElementById("compare-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      showComparison(pickA.value, pickB.value, compareBox);
    });
    await showReport(pick.value, reportBox);
  }

  m.pages.evaluation = { render };
})(window.moerge);
