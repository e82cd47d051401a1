/* moerge console, shared part: the key (kept in sessionStorage), calls to the JSON API with
   that key, a small DOM builder, number formats, and switching between the four pages. */
"use strict";

window.moerge = (function () {
  const KEY = "moerge.key";
  const pages = {};

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
    toString() { return `${this.status}: ${this.message}`; }
  }

  function key() { return sessionStorage.getItem(KEY) || ""; }

  function headers(extra) {
    const out = Object.assign({}, extra || {});
    if (key()) out.Authorization = "Bearer " + key();
    return out;
  }

  // The API's error body is {"error": {"message": ...}}: show that message, it says what to do.
  async function apiError(res) {
    let message = res.statusText || "request failed";
    try {
      const body = await res.json();
      message = (body.error && body.error.message) || body.detail || JSON.stringify(body);
    } catch (e) { /* not JSON: keep the status text */ }
    return new ApiError(res.status, message);
  }

  // JSON in, JSON out; a non-JSON answer (a plot) comes back as the Response itself.
  async function api(path, opts) {
    const o = opts || {};
    const init = { method: o.method || "GET", headers: headers(o.headers) };
    if (o.json !== undefined) {
      init.body = JSON.stringify(o.json);
      init.headers["Content-Type"] = "application/json";
    } else if (o.body !== undefined) {
      init.body = o.body;
    }
    const res = await fetch(path, init);
    if (!res.ok) throw await apiError(res);
    return (res.headers.get("content-type") || "").includes("json") ? res.json() : res;
  }

  // h("tr", {class: "x", onclick: f}, "text", child, [more]) — text always goes in as text, never as HTML.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "dataset") Object.assign(el.dataset, value);
      else if (name === "style") Object.assign(el.style, value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) append(el, c);
      else el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const fmt = {
    pct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1); },
    num(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits === undefined ? 1 : digits); },
    bytes(n) {
      if (n === null || n === undefined) return "unknown";
      const units = ["B", "KB", "MB", "GB"];
      let i = 0;
      while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
      return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
    },
    date(seconds) { return new Date(seconds * 1000).toLocaleString(); },
    duration(s) {
      if (s === null || s === undefined) return "–";
      if (s < 120) return `${Math.round(s)} s`;
      if (s < 7200) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
      return `${(s / 3600).toFixed(1)} h`;
    },
  };

  function errorBox(err, id) {
    return h("p", { class: "error", id: id, role: "alert" }, err instanceof ApiError ? err.toString() : String(err));
  }

  function currentPage() {
    const name = location.pathname.replace(/\/+$/, "").split("/").pop();
    return pages[name] ? name : "playground";
  }

  const state = { access: null };

  function showAccess(access) {
    const badge = document.getElementById("key-status");
    let text, cls;
    if (!access.keys_required) { text = "open server"; cls = "ok"; }
    else if (access.admin) { text = "admin key"; cls = "ok"; }
    else if (access.chat && access.key_sent) { text = "user key"; cls = "warn"; }
    else if (access.key_sent) { text = "key refused"; cls = "bad"; }
    else { text = "no key"; cls = "bad"; }
    badge.textContent = text;
    badge.className = "badge " + cls;
    badge.title = access.admin ? "this key may change the pool" : (access.admin_error || "");
  }

  async function render() {
    const root = document.getElementById("page");
    const name = currentPage();
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === name);
    document.title = `moerge · ${name}`;
    root.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      state.access = await api("/v1/access");
    } catch (err) {
      root.replaceChildren(errorBox(err, "access-error"));
      return;
    }
    showAccess(state.access);
    if (!state.access.chat) {
      root.replaceChildren(h("section", { class: "card", id: "need-key" },
        h("h1", {}, "An API key is needed"),
        h("p", {}, state.access.key_sent
          ? "The server refused this key: " + state.access.chat_error
          : "This server has keys. Enter your API key above; it is kept for this browser tab only (sessionStorage)."),
      ));
      return;
    }
    root.replaceChildren();
    await pages[name].render(root, { access: state.access });
  }

  function setupKeyForm() {
    const input = document.getElementById("key-input");
    document.getElementById("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      if (input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
      input.value = "";
      render();
    });
    document.getElementById("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      render();
    });
  }

  document.addEventListener("DOMContentLoaded", () => { setupKeyForm(); render(); });

  return { pages, api, apiError, headers, h, append, fmt, errorBox, ApiError, state, render };
})();
