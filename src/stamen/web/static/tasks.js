/* Tasks page: server-side paged/sorted/searched table over /tasks/datatable, patched live. */
(function () {
  "use strict";
  const S = window.Stamen;
  const { el, url } = S;
  const table = document.getElementById("tasks-table");
  const body = document.getElementById("tasks-body");
  const search = document.getElementById("task-search");
  const typeSel = document.getElementById("filter-type");
  const workerSel = document.getElementById("filter-worker");
  const stateSel = document.getElementById("filter-state");
  const from = document.getElementById("filter-from");
  const to = document.getElementById("filter-to");
  const errorBox = document.getElementById("search-error");
  const summary = document.getElementById("tasks-summary");
  const pageInfo = document.getElementById("page-info");
  const sizeSel = document.getElementById("page-size");
  const newNote = document.getElementById("new-tasks");
  const columns = [...table.querySelectorAll("thead th[data-column]")].map((th) => th.dataset.column);
  const canAct = S.canAct() && !!document.getElementById("select-all");
  const fmtTime = S.timeFormatter(table.dataset.time || "time");
  const TIME_COLUMNS = new Set(["received", "started", "revoked", "sent", "succeeded", "failed", "timestamp"]);
  const STORE_KEY = "stamen-tasks-view:" + columns.join(",");

  const saved = (() => { try { return JSON.parse(localStorage.getItem(STORE_KEY)) || {}; } catch (e) { return {}; } })();
  const view = {
    start: 0,
    length: Number(saved.length) || 15,
    sort: saved.sort || (columns.includes("received") ? "received" : columns.find((c) => c !== "uuid") || ""),
    dir: saved.dir || "desc",
  };
  sizeSel.value = String(view.length);
  let draw = 0, total = 0, filtered = 0, visible = new Map(), selected = new Set();

  function isLiveTop() { return view.start === 0 && view.dir === "desc" && ["received", "started", ""].includes(view.sort); }

  const zone = S.zoneOf(table.dataset.time || "time");
  function localDate(input) {
    // The date is typed in the zone the table shows times in; the server gets epoch seconds,
    // which mean the same whatever zone the browser or the server is in.
    const epoch = S.zonedEpoch(input.value, zone);
    return epoch === null ? "" : String(epoch);
  }

  function params() {
    const p = new URLSearchParams();
    p.set("draw", String(++draw));
    p.set("start", String(view.start));
    p.set("length", String(view.length));
    columns.forEach((c, i) => p.set(`columns[${i}][data]`, c));
    const idx = columns.indexOf(view.sort);
    p.set("order[0][column]", String(idx < 0 ? 0 : idx));
    if (idx < 0) p.set("columns[0][data]", "");
    p.set("order[0][dir]", view.dir);
    p.set("search[value]", search.value.trim());
    if (typeSel.value) p.set("taskname", typeSel.value);
    if (workerSel.value) p.set("workername", workerSel.value);
    if (stateSel.value) p.set("state", stateSel.value);
    if (localDate(from)) p.set("received_start", localDate(from));
    if (localDate(to)) p.set("received_end", localDate(to));
    return p;
  }

  function textCell(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return el("td", { class: "cell-text", title: text.length > 40 ? text : null }, text);
  }

  function cell(column, task) {
    const v = task[column];
    switch (column) {
      case "name": return el("td", {}, v ? el("a", { href: url("/tasks?name=" + encodeURIComponent(v)) }, v) : "");
      case "uuid": return el("td", {}, el("a", { class: "task-id", href: url("/task/" + encodeURIComponent(v)), title: v },
        el("span", { class: "id-short" }, v.slice(0, 8)), el("span", { class: "id-rest" }, v.slice(8))));
      case "state": return el("td", { "data-cell": "state" }, S.stateBadge(v));
      case "runtime": return el("td", { class: "num", "data-cell": "runtime" }, S.duration(v));
      case "worker": return el("td", { "data-cell": "worker" }, v ? el("a", { href: url("/worker/" + encodeURIComponent(v)) }, v) : "");
      case "retries": return el("td", { class: "num" }, v === null || v === undefined ? "" : String(v));
      default:
        if (TIME_COLUMNS.has(column)) return el("td", { "data-cell": column, title: v ? new Date(v * 1000).toISOString() : null }, fmtTime(v));
        return textCell(v);
    }
  }

  function row(task) {
    const tr = el("tr", { "data-uuid": task.uuid, "data-state": task.state || "" });
    if (canAct) {
      const box = el("input", { type: "checkbox", "aria-label": "Select task " + task.uuid });
      box.checked = selected.has(task.uuid);
      box.addEventListener("change", () => { box.checked ? selected.add(task.uuid) : selected.delete(task.uuid); updateBulk(); });
      tr.append(el("td", { class: "select" }, box));
    }
    for (const c of columns) { const td = cell(c, task); td.dataset.col = c; tr.append(td); }
    return tr;
  }

  let inflight = null;
  async function load() {
    if (inflight) inflight.abort();
    const controller = inflight = new AbortController();
    table.setAttribute("aria-busy", "true");
    let data;
    try {
      const r = await fetch(url("/tasks/datatable?" + params()), { signal: controller.signal, credentials: "same-origin" });
      if (!r.ok) throw new Error(await r.text());
      data = await r.json();
    } catch (err) {
      if (err.name !== "AbortError") S.toast("Could not load tasks: " + err.message, true);
      return;
    } finally {
      if (inflight === controller) { inflight = null; table.setAttribute("aria-busy", "false"); }
    }
    if (Number(data.draw) !== draw) return;
    total = data.recordsTotal; filtered = data.recordsFiltered;
    if (data.searchError) {
      errorBox.hidden = false;
      document.getElementById("search-error-text").textContent = data.searchError;
    } else {
      errorBox.hidden = true;
    }
    visible = new Map();
    const rows = data.data.map((t) => { const tr = row(t); visible.set(t.uuid, tr); return tr; });
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: String(columns.length + (canAct ? 1 : 0)) }, data.searchError ? "Fix the search to see tasks." : "No tasks match.")));
    body.replaceChildren(...rows);
    const last = Math.min(view.start + view.length, filtered);
    pageInfo.textContent = filtered ? `${view.start + 1}–${last} of ${filtered.toLocaleString()}` : "0 of 0";
    summary.textContent = filtered === total ? `${total.toLocaleString()} task${total === 1 ? "" : "s"}` : `${filtered.toLocaleString()} of ${total.toLocaleString()} tasks match`;
    document.getElementById("page-prev").disabled = view.start === 0;
    document.getElementById("page-next").disabled = last >= filtered;
    newNote.hidden = true; pending = 0;
    updateHeaders(); updateStateButtons(); updateBulk();
    try { localStorage.setItem(STORE_KEY, JSON.stringify({ length: view.length, sort: view.sort, dir: view.dir })); } catch (e) { /* private mode */ }
  }

  function updateHeaders() {
    table.querySelectorAll("thead th[data-column]").forEach((th) => {
      if (th.dataset.column === "uuid") return;
      th.setAttribute("aria-sort", th.dataset.column === view.sort ? (view.dir === "desc" ? "descending" : "ascending") : "none");
    });
  }

  function currentState() {
    const m = search.value.match(/(?:^|\s)state:(\S+)/i);
    return m ? m[1].toUpperCase() : "";
  }
  function updateStateButtons() {
    const st = currentState();
    document.querySelectorAll(".state-buttons [data-state]").forEach((b) => b.setAttribute("aria-pressed", b.dataset.state === st ? "true" : "false"));
  }

  function updateBulk() {
    const box = document.getElementById("bulk-actions");
    if (!box) return;
    const matching = document.getElementById("bulk-matching");
    if (matching) matching.hidden = !Object.keys(selectionFields()).length;
    box.hidden = selected.size === 0;
    document.getElementById("bulk-count").textContent = `${selected.size} selected`;
  }

  let timer = null;
  function reload(delay) { clearTimeout(timer); timer = setTimeout(load, delay || 0); }

  search.addEventListener("input", () => { view.start = 0; updateStateButtons(); reload(300); });
  for (const f of [typeSel, workerSel, stateSel, from, to]) f.addEventListener("change", () => { view.start = 0; reload(); });
  sizeSel.addEventListener("change", () => { view.length = Number(sizeSel.value); view.start = 0; reload(); });
  document.getElementById("page-prev").addEventListener("click", () => { view.start = Math.max(0, view.start - view.length); reload(); });
  document.getElementById("page-next").addEventListener("click", () => { view.start += view.length; reload(); });
  newNote.addEventListener("click", () => { view.start = 0; reload(); });
  table.querySelectorAll("button.sort").forEach((b) => b.addEventListener("click", () => {
    const c = b.dataset.sort;
    view.dir = view.sort === c && view.dir === "desc" ? "asc" : "desc";
    view.sort = c; view.start = 0; reload();
  }));
  document.querySelectorAll(".state-buttons [data-state]").forEach((b) => b.addEventListener("click", () => {
    const rest = search.value.replace(/(?:^|\s)state:\S+/gi, " ").trim();
    search.value = b.dataset.state ? `state:${b.dataset.state} ${rest}`.trim() : rest;
    view.start = 0; updateStateButtons(); reload();
  }));
  const all = document.getElementById("select-all");
  if (all) all.addEventListener("change", () => {
    body.querySelectorAll("td.select input").forEach((box) => { box.checked = all.checked; box.dispatchEvent(new Event("change")); });
  });
  const VERBS = { revoke: ["Revoke", "revoked"], terminate: ["Terminate", "terminated"], retry: ["Retry", "retried"] };
  document.querySelectorAll("[data-bulk]").forEach((b) => b.addEventListener("click", async () => {
    const kind = b.dataset.bulk;
    if (!window.confirm(`${VERBS[kind][0]} ${selected.size} selected task(s)?`)) return;
    let ok = 0, failed = 0;
    for (const id of [...selected]) {
      const path = kind === "retry" ? "/api/task/retry/" : "/api/task/revoke/";
      const fields = kind === "retry" ? {} : { terminate: kind === "terminate" ? "true" : "false" };
      try { await S.send("POST", path + encodeURIComponent(id), fields); ok++; } catch (e) { failed++; }
    }
    S.toast(`${ok} ${VERBS[kind][1]}${failed ? `, ${failed} failed` : ""}`, failed > 0);
    selected.clear(); if (all) all.checked = false; updateBulk();
  }));
  // Everything matching the search: ask the server how many first (dry run), then confirm.
  function selectionFields() {
    const f = {};
    if (search.value.trim()) f.search = search.value.trim();
    if (typeSel.value) f.taskname = typeSel.value;
    if (workerSel.value) f.workername = workerSel.value;
    if (stateSel.value) f.state = stateSel.value;
    if (localDate(from)) f.received_start = localDate(from);
    if (localDate(to)) f.received_end = localDate(to);
    return f;
  }
  document.querySelectorAll("[data-bulk-matching]").forEach((b) => b.addEventListener("click", async () => {
    const kind = b.dataset.bulkMatching, fields = selectionFields();
    const path = `/api/tasks/bulk/${kind}`;
    try {
      const preview = JSON.parse(await S.sendRaw("POST", path, { ...fields, dry_run: "true" }));
      if (!preview.count) { S.toast("No task matches."); return; }
      if (!window.confirm(`${VERBS[kind][0]} ${preview.count} of ${preview.matched} matching task(s)?`)) return;
      S.toast(await S.send("POST", path, fields));
    } catch (err) { S.toast(err.message, true); }
  }));

  // Throttled, not debounced: a steady stream of events must not postpone the refresh.
  let liveTimer = null;
  function liveReload() {
    if (liveTimer) return;
    liveTimer = setTimeout(() => { liveTimer = null; load(); }, 1000);
  }

  // -- live: patch visible rows, and refresh the first page when new tasks arrive ----------
  let pending = 0;
  S.on("tasks", (msg) => {
    let unseen = 0;
    for (const t of msg.tasks || []) {
      const tr = visible.get(t.uuid);
      if (!tr) { unseen++; continue; }
      if (tr.dataset.state !== (t.state || "")) {
        tr.dataset.state = t.state || "";
        const c = tr.querySelector('[data-cell="state"]');
        if (c) c.replaceChildren(S.stateBadge(t.state));
        tr.classList.remove("flash"); void tr.offsetWidth; tr.classList.add("flash");
      }
      for (const k of ["runtime", "started", "received", "worker"]) {
        const c = tr.querySelector(`[data-cell="${k}"]`);
        if (!c || t[k] === null || t[k] === undefined) continue;
        if (k === "runtime") c.textContent = S.duration(t[k]);
        else if (k === "worker") c.replaceChildren(el("a", { href: url("/worker/" + encodeURIComponent(t[k])) }, t[k]));
        else c.textContent = fmtTime(t[k]);
      }
    }
    if (!unseen) return;
    if (isLiveTop()) liveReload();
    else {
      pending += unseen;
      newNote.hidden = false;
      newNote.textContent = `${pending} new or changed task${pending === 1 ? "" : "s"} elsewhere; go to the first page to see them.`;
    }
  });
  S.on("resync", () => reload(500));

  // -- live: new task types, states and workers join the filter dropdowns -----------------
  function addOptions(select, names) {
    const known = new Set([...select.options].map((o) => o.value));
    const added = [...new Set(names || [])].filter((n) => n && !known.has(n));
    if (!added.length) return;
    const all = [...select.options].slice(1).map((o) => o.value).concat(added);
    // Sorted like the server renders them (states keep Celery's order, new ones last).
    if (select !== stateSel) all.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const chosen = select.value;
    select.replaceChildren(select.options[0], ...all.map((n) => el("option", { value: n }, n)));
    select.value = chosen;
  }
  S.on("names", (msg) => { addOptions(typeSel, msg.types); addOptions(stateSel, msg.states); });
  S.on("workers", (msg) => addOptions(workerSel, (msg.data || []).map((w) => w.hostname)));

  load();
})();
