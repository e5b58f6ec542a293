/* Workers page: rows and summary cards patched from the live stream; client-side filter. */
(function () {
  "use strict";
  const { el, url, on } = window.Stamen;
  const body = document.getElementById("workers-body");
  const filter = document.getElementById("worker-filter");
  const dash = () => el("span", { class: "value-missing", "aria-label": "none" }, "—");

  function countLink(host, state, value) {
    let href = "/tasks?worker=" + encodeURIComponent(host);
    if (state) href += "&state=" + state;
    return el("a", { href: url(href) }, String(value || 0));
  }

  function row(w) {
    const host = w.hostname;
    const tr = el("tr", { id: encodeURIComponent(host), "data-worker": host, class: w.status ? "online" : "offline" },
      el("td", {}, el("a", { href: url("/worker/" + encodeURIComponent(host)) }, host)),
      el("td", {}, el("span", { class: "badge " + (w.status ? "state-success" : "state-offline"), text: w.status ? "Online" : "Offline" })),
      el("td", { class: "num" }, countLink(host, "STARTED", w.active)),
      el("td", { class: "num" }, countLink(host, "", w["task-received"])),
      el("td", { class: "num" }, countLink(host, "FAILURE", w["task-failed"])),
      el("td", { class: "num" }, countLink(host, "SUCCESS", w["task-succeeded"])),
      el("td", {}, w.status && w.loadavg ? el("span", { title: "1m / 5m / 15m" }, w.loadavg.join(" · ")) : dash()));
    return tr;
  }

  function applyFilter() {
    const q = (filter.value || "").trim().toLowerCase();
    for (const tr of body.querySelectorAll("tr[data-worker]")) {
      const online = tr.classList.contains("online") ? "online" : "offline";
      tr.hidden = q !== "" && !(tr.dataset.worker.toLowerCase().includes(q) || online === q);
    }
  }

  function render(records) {
    records.sort((a, b) => (b.status - a.status) || a.hostname.localeCompare(b.hostname));
    const rows = records.map(row);
    if (!rows.length) rows.push(el("tr", { class: "empty" }, el("td", { colspan: "7" }, "No workers have sent events yet.")));
    body.replaceChildren(...rows);
    const sum = (key) => records.reduce((n, w) => n + (Number(w[key]) || 0), 0);
    document.getElementById("sum-online").textContent = records.filter((w) => w.status).length;
    document.getElementById("sum-active").textContent = sum("active");
    document.getElementById("sum-succeeded").textContent = sum("task-succeeded");
    document.getElementById("sum-failed").textContent = sum("task-failed");
    applyFilter();
  }

  filter.addEventListener("input", applyFilter);
  // --auto_refresh=False keeps the first render, as Flower stops polling.
  if (document.getElementById("workers-table").dataset.live === "false") return;
  on("workers", (data) => render(data.data || []));
  on("resync", () => fetch(url("/workers?json=1")).then((r) => r.json()).then((d) => render(d.data)));
})();
