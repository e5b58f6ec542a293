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
  const thead = table.querySelector("thead");
  const all = document.getElementById("select-all");
  const canAct = S.canAct() && !!all;
  const selectHead = all ? all.closest("th") : null;
  const fmtTime = S.timeFormatter(table.dataset.time || "time");
  const TIME_COLUMNS = new Set(["received", "started", "revoked", "sent", "succeeded", "failed", "timestamp"]);

  // -- the view: columns, paging, sort and search, remembered in this browser -------------
  // Every column Flower allows is listed in the Columns menu; --tasks_columns is the default
  // set and order. The key is versioned and per mount point, not per default: a user's
  // choice outlives a change of --tasks_columns (minus the columns that no longer exist).
  const menu = document.getElementById("columns-menu");
  const menuList = document.getElementById("columns-list");
  const LABELS = new Map([...menuList.querySelectorAll("li[data-column]")].map((li) => [li.dataset.column, li.dataset.label]));
  const DEFAULT = (table.dataset.defaultColumns || "").split(",").filter((c) => LABELS.has(c));
  const STORE_KEY = "stamen-tasks-view:v2:" + S.base;
  const OLD_KEY = "stamen-tasks-view:" + DEFAULT.join(",");  // before columns could change

  function readStore(key) {
    try { const v = JSON.parse(localStorage.getItem(key)); return v && typeof v === "object" && !Array.isArray(v) ? v : null; } catch (e) { return null; }
  }
  function knownColumns(list) {
    // Saved columns that still exist, each once; null when none is left (use the default).
    if (!Array.isArray(list)) return null;
    const out = [...new Set(list.filter((c) => typeof c === "string" && LABELS.has(c)))];
    return out.length ? out : null;
  }
  const saved = readStore(STORE_KEY) || readStore(OLD_KEY) || {};
  let columns = knownColumns(saved.columns) || DEFAULT.slice();
  const view = {
    start: 0,
    length: [15, 30, 50, 100].includes(Number(saved.length)) ? Number(saved.length) : 15,
    sort: typeof saved.sort === "string" ? saved.sort : "",
    dir: saved.dir === "asc" ? "asc" : "desc",
  };
  // A prefill from the URL (?state=, ?name=, ?worker=) wins over the remembered search.
  if (!search.defaultValue && typeof saved.search === "string") search.value = saved.search;
  sizeSel.value = String(view.length);
  let draw = 0, total = 0, filtered = 0, visible = new Map(), selected = new Set();

  function sortable(c) { return c !== "uuid" && columns.includes(c); }
  function keepSortValid() {
    // The sort column was hidden: sort by received when shown, else by the first column.
    if (sortable(view.sort)) return;
    view.sort = sortable("received") ? "received" : columns.find(sortable) || "";
    view.dir = "desc";
  }
  keepSortValid();

  function saveView() {
    const state = { v: 2, columns, length: view.length, sort: view.sort, dir: view.dir, search: search.value };
    try { localStorage.setItem(STORE_KEY, JSON.stringify(state)); } catch (e) { /* private mode */ }
  }

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
    let idx = columns.indexOf(view.sort);
    if (idx < 0) { idx = columns.length; p.set(`columns[${idx}][data]`, ""); }  // the server's default order
    p.set("order[0][column]", String(idx));
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
    for (const t of data.data) visible.set(t.uuid, null);
    // Only what the user can see stays selected: a search, a filter, another page or new
    // tasks pushing a row off this page unselect it.
    for (const id of [...selected]) if (!visible.has(id)) selected.delete(id);
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
    saveView();
  }

  function updateHeaders() {
    table.querySelectorAll("thead th[data-column]").forEach((th) => {
      if (th.dataset.column === "uuid") return;
      th.setAttribute("aria-sort", th.dataset.column === view.sort ? (view.dir === "desc" ? "descending" : "ascending") : "none");
    });
  }

  // -- columns: the header, the menu, drag and drop ---------------------------------------
  function buildHead() {
    const tr = el("tr");
    if (selectHead) tr.append(selectHead);
    for (const c of columns) {
      const label = LABELS.get(c);
      tr.append(el("th", { scope: "col", "data-column": c, draggable: "true" },
        c === "uuid" ? label : el("button", { type: "button", class: "sort", "data-sort": c }, label)));
    }
    thead.replaceChildren(tr);
    table.classList.toggle("chosen-columns", columns.join() !== DEFAULT.join());
    updateHeaders();
  }

  function syncMenu() {
    const items = new Map([...menuList.querySelectorAll("li[data-column]")].map((li) => [li.dataset.column, li]));
    const order = [...columns, ...[...LABELS.keys()].filter((c) => !columns.includes(c))];
    const focused = menuList.contains(document.activeElement) ? document.activeElement : null;
    const current = [...menuList.children].map((li) => li.dataset.column);
    if (current.join() !== order.join()) menuList.append(...order.map((c) => items.get(c)));
    for (const [c, li] of items) {
      const at = columns.indexOf(c), shown = at >= 0;
      li.classList.toggle("shown", shown);
      const box = li.querySelector("input");
      box.checked = shown;
      box.disabled = shown && columns.length === 1;  // one column at least
      li.querySelector("[data-move='-1']").disabled = !shown || at === 0;
      li.querySelector("[data-move='1']").disabled = !shown || at === columns.length - 1;
    }
    // Moving an item in the list takes the focus away: give it back, or to a neighbour.
    if (focused && document.activeElement !== focused) {
      const li = focused.closest("li");
      const target = [focused, ...li.querySelectorAll("button.move"), li.querySelector("input")].find((n) => !n.disabled);
      if (target) target.focus();
    }
  }

  function announce(text) { document.getElementById("columns-status").textContent = text; }

  function setColumns(next, message) {
    columns = next;
    keepSortValid();
    buildHead();
    syncMenu();
    saveView();
    if (message) announce(message);
    body.querySelectorAll("tr.empty td").forEach((td) => td.setAttribute("colspan", String(columns.length + (canAct ? 1 : 0))));
    reload();
  }

  function moveTo(c, index) {
    const next = columns.filter((x) => x !== c);
    next.splice(Math.max(0, Math.min(index, next.length)), 0, c);
    if (next.join() === columns.join()) return;
    setColumns(next, `${LABELS.get(c)} moved to position ${next.indexOf(c) + 1} of ${next.length}`);
  }

  menuList.addEventListener("change", (ev) => {
    const box = ev.target.closest("input[type=checkbox]");
    if (!box) return;
    const c = box.value;
    if (box.checked && !columns.includes(c)) setColumns([...columns, c], `${LABELS.get(c)} shown`);
    else if (!box.checked && columns.includes(c) && columns.length > 1) setColumns(columns.filter((x) => x !== c), `${LABELS.get(c)} hidden`);
  });
  menuList.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-move]");
    if (!b) return;
    const c = b.closest("li").dataset.column;
    if (columns.includes(c)) moveTo(c, columns.indexOf(c) + Number(b.dataset.move));
  });
  document.getElementById("columns-reset").addEventListener("click", () => setColumns(DEFAULT.slice(), "Default columns restored"));
  menu.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && menu.open) { menu.open = false; menu.querySelector("summary").focus(); }
  });
  document.addEventListener("click", (ev) => { if (menu.open && !menu.contains(ev.target)) menu.open = false; });

  // Drag a header onto another: it goes before or after it, by which half it is dropped on.
  let dragged = null;
  function headOf(ev) { return ev.target instanceof Element ? ev.target.closest("th[data-column]") : null; }
  function clearMarks() { thead.querySelectorAll(".drop-before, .drop-after, .dragging").forEach((th) => th.classList.remove("drop-before", "drop-after", "dragging")); }
  function after(th, ev) { const r = th.getBoundingClientRect(); return ev.clientX > r.left + r.width / 2; }
  thead.addEventListener("dragstart", (ev) => {
    const th = headOf(ev);
    if (!th) return;
    dragged = th.dataset.column;
    ev.dataTransfer.effectAllowed = "move";
    ev.dataTransfer.setData("text/plain", LABELS.get(dragged));
    th.classList.add("dragging");
  });
  thead.addEventListener("dragover", (ev) => {
    const th = headOf(ev);
    if (!dragged || !th) return;
    ev.preventDefault();
    ev.dataTransfer.dropEffect = "move";
    const side = after(th, ev);
    thead.querySelectorAll(".drop-before, .drop-after").forEach((x) => { if (x !== th) x.classList.remove("drop-before", "drop-after"); });
    th.classList.toggle("drop-after", side);
    th.classList.toggle("drop-before", !side);
  });
  thead.addEventListener("drop", (ev) => {
    const th = headOf(ev);
    if (!dragged || !th) return;
    ev.preventDefault();
    const c = dragged, target = th.dataset.column, side = after(th, ev);
    dragged = null; clearMarks();
    if (c === target) return;
    const rest = columns.filter((x) => x !== c);
    moveTo(c, rest.indexOf(target) + (side ? 1 : 0));
  });
  thead.addEventListener("dragend", () => { dragged = null; clearMarks(); });

  function currentState() {
    const m = search.value.match(/(?:^|\s)state:(\S+)/i);
    return m ? m[1].toUpperCase() : "";
  }
  function updateStateButtons() {
    const st = currentState();
    document.querySelectorAll(".state-buttons [data-state]").forEach((b) => b.setAttribute("aria-pressed", b.dataset.state === st ? "true" : "false"));
  }

  function updateBulk() {
    if (all) {
      // The select-all box says whether every row of this page is selected (never ticked
      // on a page whose rows were not all chosen, e.g. after paging).
      const ids = [...visible.keys()], chosen = ids.filter((id) => selected.has(id)).length;
      all.checked = ids.length > 0 && chosen === ids.length;
      all.indeterminate = chosen > 0 && chosen < ids.length;
    }
    const box = document.getElementById("bulk-actions");
    if (!box) return;
    const matching = document.getElementById("bulk-matching");
    if (matching) matching.hidden = !Object.keys(selectionFields()).length;
    box.hidden = selected.size === 0;
    document.getElementById("bulk-count").textContent = `${selected.size} selected`;
  }

  let timer = null;
  function reload(delay) { clearTimeout(timer); timer = setTimeout(load, delay || 0); }

  search.addEventListener("input", () => { view.start = 0; updateStateButtons(); saveView(); reload(300); });
  for (const f of [typeSel, workerSel, stateSel, from, to]) f.addEventListener("change", () => { view.start = 0; reload(); });
  sizeSel.addEventListener("change", () => { view.length = Number(sizeSel.value); view.start = 0; reload(); });
  document.getElementById("page-prev").addEventListener("click", () => { view.start = Math.max(0, view.start - view.length); reload(); });
  document.getElementById("page-next").addEventListener("click", () => { view.start += view.length; reload(); });
  newNote.addEventListener("click", () => { view.start = 0; reload(); });
  thead.addEventListener("click", (ev) => {
    const b = ev.target.closest("button.sort");
    if (!b) return;
    const c = b.dataset.sort;
    view.dir = view.sort === c && view.dir === "desc" ? "asc" : "desc";
    view.sort = c; view.start = 0; updateHeaders(); reload();
  });
  document.querySelectorAll(".state-buttons [data-state]").forEach((b) => b.addEventListener("click", () => {
    const rest = search.value.replace(/(?:^|\s)state:\S+/gi, " ").trim();
    search.value = b.dataset.state ? `state:${b.dataset.state} ${rest}`.trim() : rest;
    view.start = 0; updateStateButtons(); reload();
  }));
  if (all) all.addEventListener("change", () => {
    const on = all.checked;
    body.querySelectorAll("td.select input").forEach((box) => { box.checked = on; box.dispatchEvent(new Event("change")); });
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

  buildHead();
  syncMenu();
  menu.hidden = false;
  load();
})();
