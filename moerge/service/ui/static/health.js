/* Health page: readiness, the engine's own description of its state (whatever keys it
   reports; nothing is filled in here), and key metrics since the service started. */
"use strict";

(function (m) {
  const { h, api, fmt } = m;

  function value(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "object") return h("code", { class: "json" }, JSON.stringify(v, null, 1));
    return String(v);
  }

  const kvTable = (obj, id) => h("table", { class: "grid kv", id },
    h("tbody", {}, Object.entries(obj).map(([k, v]) => h("tr", { dataset: { key: k } }, h("th", {}, k), h("td", {}, value(v))))));

  function engineState(x) {
    return h("div", { class: "engine", dataset: { engine: x.name } },
      h("h3", {}, `${x.name} `, h("span", { class: "muted" }, `(${x.role})`)),
      x.state ? kvTable(x.state, null)
        : h("p", { class: "muted" }, "This engine does not describe its state (no describe() method)."),
      x.state_error ? h("p", { class: "error" }, `describe() failed: ${x.state_error}`) : null);
  }

  function engineCard(e) {
    return h("section", { class: "card", id: "engine" },
      h("h2", {}, "Engine ", h("span", { class: `badge ${e.ready ? "ok" : "warn"}`, id: "engine-ready" },
        e.ready ? "ready" : "starting")),
      h("p", {}, `Preferred executor: ${e.executor}. `, h("span", { class: "muted" },
        e.ready ? "GET /readyz answers 200." : "GET /readyz answers 503 until it is up; the fallback answers meanwhile.")),
      kvTable(e.readiness, "readiness"),
      h("p", { class: "muted" }, "Each engine's own account of itself: resident experts, slots, placement — whatever it reports."),
      h("div", { id: "engines" }, e.engines.map(engineState)),
    );
  }

  function metricsCard(s) {
    const req = s.requests;
    const routing = Object.entries(s.routing);
    const experts = Object.entries(s.experts).sort((a, b) => b[1] - a[1]);
    return h("section", { class: "card", id: "metrics" },
      h("h2", {}, "Key metrics"),
      h("p", { class: "muted" }, `Since the service started ${fmt.duration(s.uptime_seconds)} ago. GET /metrics has them for Prometheus.`),
      h("div", { class: "tiles" },
        h("div", { class: "tile" }, h("b", { id: "metric-requests" }, String(s.requests_total)), "HTTP requests",
          h("small", {}, Object.entries(req).sort().map(([k, v]) => `${k} ${v}`).join(" · "))),
        h("div", { class: "tile" }, h("b", {}, String(s.tokens.completion || 0)), "tokens generated",
          h("small", {}, `${s.tokens.prompt || 0} prompt tokens`)),
        h("div", { class: "tile" }, h("b", {}, String(routing.reduce((n, [, r]) => n + r.requests, 0))), "routing decisions"),
      ),
      h("div", { class: "row align-top" },
        h("table", { class: "grid", id: "routing-metrics" },
          h("thead", {}, h("tr", {}, h("th", {}, "method"), h("th", {}, "requests"), h("th", {}, "mean routing ms"))),
          h("tbody", {}, routing.length ? routing.map(([k, r]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, String(r.requests)),
            h("td", { class: "num" }, fmt.num(r.mean_ms, 2))))
            : h("tr", {}, h("td", { colspan: 3, class: "muted" }, "no requests routed yet")))),
        h("table", { class: "grid", id: "expert-usage" },
          h("thead", {}, h("tr", {}, h("th", {}, "expert"), h("th", {}, "requests"))),
          h("tbody", {}, experts.length ? experts.map(([k, v]) => h("tr", { dataset: { expert: k } }, h("td", {}, k), h("td", { class: "num" }, String(v))))
            : h("tr", {}, h("td", { colspan: 2, class: "muted" }, "no expert used yet")))),
      ),
    );
  }

  async function render(root) {
    const body = h("div", { id: "health-body" });
    const refresh = h("button", { type: "button", id: "health-refresh", class: "quiet" }, "Refresh");
    m.append(root, [h("div", { class: "row" }, h("h1", {}, "Health"), refresh), body]);
    async function load() {
      try {
        const [engine, stats] = await Promise.all([api("/v1/engine"), api("/v1/stats")]);
        body.replaceChildren(engineCard(engine), metricsCard(stats));
      } catch (err) {
        body.replaceChildren(m.errorBox(err, "health-error"));
      }
    }
    refresh.addEventListener("click", load);
    await load();
  }

  m.pages.health = { render };
})(window.moerge);
