/* Stamen: shared page behaviour (live stream, actions, toasts, tabs, copy, time formats). */
(function () {
  "use strict";
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const base = meta("stamen-base");
  const csrf = meta("stamen-csrf");

  function url(path) { return base + path; }

  function toast(text, isError) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const el = document.createElement("div");
    el.className = "toast" + (isError ? " error" : "");
    el.setAttribute("role", isError ? "alert" : "status");
    el.textContent = text;
    box.appendChild(el);
    setTimeout(() => el.remove(), isError ? 10000 : 5000);
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  // -- live updates ---------------------------------------------------------------------
  const handlers = {};
  let source = null;
  function setStatus(state, text) {
    const s = document.getElementById("live-status");
    if (s) { s.hidden = false; s.dataset.state = state; s.textContent = text; }
  }
  function connect() {
    if (source || !window.EventSource) return;
    source = new EventSource(url("/live"));
    setStatus("idle", "Connecting…");
    source.addEventListener("hello", () => setStatus("live", "Live"));
    source.onerror = () => setStatus("error", "Reconnecting…");
    for (const kind of ["tasks", "workers", "names", "resync"]) {
      source.addEventListener(kind, (ev) => {
        let data = {};
        try { data = JSON.parse(ev.data); } catch (e) { return; }
        setStatus("live", "Updated " + new Date().toLocaleTimeString());
        for (const fn of handlers[kind] || []) fn(data);
      });
    }
  }
  function on(kind, fn) { (handlers[kind] = handlers[kind] || []).push(fn); connect(); }
  window.addEventListener("pagehide", () => { if (source) { source.close(); source = null; } });

  // -- actions ----------------------------------------------------------------------------
  async function send(method, path, fields, raw) {
    const headers = { "X-Requested-With": "XMLHttpRequest" };
    if (csrf) { headers["X-CSRF-Token"] = csrf; headers["X-XSRFToken"] = csrf; }
    const init = { method, headers, credentials: "same-origin" };
    if (method === "POST") {
      const body = new URLSearchParams(fields || {});
      if (csrf) body.set("_xsrf", csrf);
      init.body = body;
    }
    const response = await fetch(url(path), init);
    const text = await response.text();
    if (raw) { if (!response.ok) throw new Error(text || `${response.status} ${response.statusText}`); return text; }
    let message = text;
    try { const data = JSON.parse(text); if (data && data.message) message = data.message; } catch (e) { /* plain text */ }
    if (!response.ok) throw new Error(message || `${response.status} ${response.statusText}`);
    return message;
  }

  function fieldsOf(node) {
    const out = {};
    for (const [k, v] of Object.entries(node.dataset)) {
      if (k.startsWith("field") && k.length > 5) out[k.slice(5).toLowerCase()] = v;
    }
    return out;
  }

  // After an action that changes what the page shows: re-render it server-side and swap the
  // content in place (the toast stays, no reload); a full reload only without htmx.
  function refreshMain() {
    if (!window.htmx) { location.reload(); return; }
    window.htmx.ajax("GET", location.pathname + location.search, { target: "#main-content", select: "#main-content", swap: "outerHTML" });
  }

  async function runAction(trigger, method, path, fields) {
    if (trigger.dataset.confirm && !window.confirm(trigger.dataset.confirm)) return;
    trigger.disabled = true;
    try {
      const message = await send(method, path, fields);
      toast(trigger.dataset.done || message || "Done");
      if (trigger.dataset.reload !== undefined) setTimeout(refreshMain, 1000);
    } catch (err) {
      toast(err.message, true);
    } finally {
      trigger.disabled = false;
    }
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-post]:not([type=submit]), button[data-get]");
    if (button) {
      ev.preventDefault();
      if (button.dataset.get) runAction(button, "GET", button.dataset.get);
      else runAction(button, "POST", button.dataset.post, fieldsOf(button));
      return;
    }
    const copy = ev.target.closest("button[data-copy], button[data-copy-target]");
    if (copy) {
      ev.preventDefault();
      const source = copy.dataset.copyTarget ? document.getElementById(copy.dataset.copyTarget)
        : copy.closest("details").querySelector("pre");
      if (source && navigator.clipboard) navigator.clipboard.writeText(source.textContent).then(() => toast("Copied"));
    }
  });

  document.addEventListener("submit", (ev) => {
    const form = ev.target.closest("form[data-action-form]");
    if (!form) return;
    ev.preventDefault();
    // Enter in a field submits the form even without a button: a viewer has none, and
    // nothing may happen then.
    const submitter = ev.submitter || form.querySelector("button[type=submit]");
    if (!submitter || submitter.disabled) return;
    const fields = Object.fromEntries(new FormData(form));
    const seconds = form.querySelector("[data-timeout]");
    if (seconds) {
      delete fields.seconds;
      if (!/^\d+(\.\d+)?$/.test(seconds.value.trim())) { toast("Invalid timeout value", true); return; }
      fields[submitter.dataset.fieldKind || "soft"] = seconds.value.trim();
    }
    runAction(submitter, "POST", submitter.dataset.post || form.dataset.post, fields);
  });

  // -- tabs (every panel shows without JS) -----------------------------------------------
  function initTabs() {
    const tabs = document.querySelectorAll(".tabs [data-tab]");
    if (!tabs.length) return;
    function show(id) {
      let found = false;
      tabs.forEach((t) => { const on = t.dataset.tab === id; found = found || on; t.setAttribute("aria-selected", on ? "true" : "false"); });
      if (!found) return show(tabs[0].dataset.tab);
      document.querySelectorAll(".tab-panel").forEach((p) => { p.hidden = p.id !== id; });
    }
    tabs.forEach((t) => t.addEventListener("click", (ev) => { ev.preventDefault(); history.replaceState(null, "", "#" + t.dataset.tab); show(t.dataset.tab); }));
    show(location.hash.slice(1));
  }

  // -- time -------------------------------------------------------------------------------
  function timeFormatter(kind) {
    // kind: "time[-Zone]" or "natural-time[-Zone]" (Flower's page attribute).
    const natural = kind.startsWith("natural-time");
    const zone = zoneOf(kind);
    let fmt;
    try {
      fmt = new Intl.DateTimeFormat("sv-SE", { timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3, hour12: false });
    } catch (e) {
      fmt = new Intl.DateTimeFormat("sv-SE", { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", fractionalSecondDigits: 3, hour12: false });
    }
    const rel = window.Intl && Intl.RelativeTimeFormat ? new Intl.RelativeTimeFormat("en", { numeric: "auto" }) : null;
    return function (epoch) {
      if (epoch === null || epoch === undefined || epoch === "") return "";
      const ms = Number(epoch) * 1000;
      if (!isFinite(ms)) return String(epoch);
      if (natural && rel) {
        const s = (ms - Date.now()) / 1000, a = Math.abs(s);
        if (a < 60) return rel.format(Math.round(s), "second");
        if (a < 3600) return rel.format(Math.round(s / 60), "minute");
        if (a < 86400) return rel.format(Math.round(s / 3600), "hour");
      }
      return fmt.format(new Date(ms)).replace(",", ".");
    };
  }

  function zoneOf(kind) {
    // The zone part of a "time[-Zone]" / "natural-time[-Zone]" attribute (none: the browser's).
    return kind.replace(/^(natural-)?time-?/, "") || undefined;
  }

  function zonedEpoch(value, zone) {
    // Seconds since the epoch of a "YYYY-MM-DDTHH:MM" wall-clock time in `zone`: read it as
    // UTC, then take off the zone's offset at that moment (twice, for a DST change between).
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(value || "");
    if (!m) return null;
    const wall = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5]);
    let parts;
    try {
      parts = new Intl.DateTimeFormat("en-US", { timeZone: zone, hourCycle: "h23", year: "numeric", month: "numeric", day: "numeric", hour: "numeric", minute: "numeric", second: "numeric" });
    } catch (e) {
      parts = new Intl.DateTimeFormat("en-US", { hourCycle: "h23", year: "numeric", month: "numeric", day: "numeric", hour: "numeric", minute: "numeric", second: "numeric" });
    }
    const offset = (ms) => {
      const p = Object.fromEntries(parts.formatToParts(new Date(ms)).map((x) => [x.type, x.value]));
      return Date.UTC(+p.year, +p.month - 1, +p.day, +p.hour, +p.minute, +p.second) - ms;
    };
    let ms = wall - offset(wall);
    ms = wall - offset(ms);
    return ms / 1000;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "";
    const v = Number(seconds);
    if (v < 1) return (v * 1000).toFixed(2) + " ms";
    if (v < 60) return v.toFixed(2) + " s";
    const total = Math.round(v), h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
    const pad = (n) => String(n).padStart(2, "0");
    return h ? `${h}h ${pad(m)}m ${pad(s)}s` : `${m}m ${pad(s)}s`;
  }

  function stateBadge(state) {
    const s = state || "unknown";
    return el("span", { class: "badge state-" + s.toLowerCase(), text: s });
  }

  document.addEventListener("DOMContentLoaded", initTabs);
  window.Stamen = { url, base, toast, send, sendRaw: (m, p, f) => send(m, p, f, true), on, el, timeFormatter, zoneOf, zonedEpoch, duration, stateBadge, canAct: () => document.body.dataset.canAct === "true" };
})();
