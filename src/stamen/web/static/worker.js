/* Worker page: status, counters and running tasks follow the live stream (no reloads). */
(function () {
  "use strict";
  const S = window.Stamen;
  const { el, url } = S;
  const live = document.getElementById("worker-live");
  if (!live) return;
  const name = live.dataset.worker;
  const fmtTime = S.timeFormatter(live.dataset.time || "time");
  const badge = document.getElementById("worker-status");
  const notice = document.getElementById("worker-offline");
  const runningBody = document.getElementById("running-body");
  const SHOWN = 50;
  const set = (id, text) => { const node = document.getElementById(id); if (node && node.textContent !== text) node.textContent = text; };

  function showStatus(online) {
    badge.className = "badge " + (online ? "state-success" : "state-offline");
    badge.textContent = online ? "Online" : "Offline";
    notice.hidden = online;
  }

  S.on("workers", (msg) => {
    const record = (msg.data || []).find((w) => w.hostname === name);
    // Not listed any more: purged after being offline too long.
    showStatus(!!(record && record.status));
    if (!record) return;
    set("live-active", String(record.active || 0));
    set("live-received", String(record["task-received"] || 0));
    set("live-succeeded", String(record["task-succeeded"] || 0));
    set("live-failed", String(record["task-failed"] || 0));
    set("live-loadavg", record.status && record.loadavg ? record.loadavg.join(" · ") : "—");
  });

  function runningIds() { return new Set([...runningBody.querySelectorAll("tr[data-uuid]")].map((tr) => tr.dataset.uuid)); }

  async function loadRunning() {
    const p = new URLSearchParams({
      draw: "1", start: "0", length: String(SHOWN), "order[0][column]": "0", "columns[0][data]": "started",
      "order[0][dir]": "desc", workername: name, state: "STARTED",
    });
    let data;
    try {
      const r = await fetch(url("/tasks/datatable?" + p), { credentials: "same-origin" });
      if (!r.ok) return;
      data = await r.json();
    } catch (e) { return; }
    const rows = (data.data || []).map((t) => el("tr", { "data-uuid": t.uuid },
      el("td", {}, t.name || ""),
      el("td", {}, el("a", { class: "task-id", href: url("/task/" + encodeURIComponent(t.uuid)), title: t.uuid },
        el("span", { class: "id-short" }, t.uuid.slice(0, 8)), el("span", { class: "id-rest" }, t.uuid.slice(8)))),
      el("td", {}, fmtTime(t.started))));
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: "3" }, "No task is running on this worker.")));
    runningBody.replaceChildren(...rows);
  }

  // Throttled: at most one fetch a second however many of this worker's tasks change.
  let timer = null;
  function refreshRunning() {
    if (timer) return;
    timer = setTimeout(() => { timer = null; loadRunning(); }, 1000);
  }
  S.on("tasks", (msg) => {
    const tasks = msg.tasks || [];
    const shown = runningIds();
    if (msg.changed > tasks.length || tasks.some((t) => t.worker === name || shown.has(t.uuid))) refreshRunning();
  });
  S.on("resync", refreshRunning);
})();
