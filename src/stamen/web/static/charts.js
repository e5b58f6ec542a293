/* Charts page: throughput, failure rate and runtime percentiles drawn with uPlot. */
(function () {
  "use strict";
  const S = window.Stamen;
  const note = document.getElementById("charts-note");
  const plots = {};
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim() || "#888";

  function axes(unit) {
    const stroke = color("--muted"), grid = { stroke: color("--border"), width: 1 };
    return [{ stroke, grid, ticks: grid }, { stroke, grid, ticks: grid, size: 56, values: (u, vals) => vals.map((v) => v === null ? "" : v + unit) }];
  }

  function draw(id, data, series, unit) {
    const box = document.getElementById(id);
    const width = Math.max(box.clientWidth, 280);
    if (plots[id]) plots[id].destroy();
    plots[id] = new uPlot({ width, height: 220, series: [{}, ...series], axes: axes(unit), scales: { x: { time: true } }, legend: { live: true } }, data, box);
    box.dataset.points = String(data[0].length);
  }

  function row(t) {
    return S.el("tr", {}, S.el("td", {}, S.el("a", { href: S.url("/tasks?name=" + encodeURIComponent(t.name)) }, t.name)),
      S.el("td", { class: "num" }, t.count.toLocaleString()),
      S.el("td", { class: "num" }, S.duration(t.p50)), S.el("td", { class: "num" }, S.duration(t.p95)));
  }

  let current = "1h";
  async function load(range) {
    current = range;
    document.querySelectorAll("[data-range]").forEach((b) => b.setAttribute("aria-pressed", b.dataset.range === range ? "true" : "false"));
    let d;
    try {
      const r = await fetch(S.url("/charts/data?range=" + encodeURIComponent(range)), { credentials: "same-origin" });
      if (!r.ok) throw new Error(await r.text());
      d = await r.json();
    } catch (err) { S.toast("Could not load chart data: " + err.message, true); return; }
    const x = d.times;
    draw("chart-throughput", [x, d.throughput], [{ label: "tasks/min", stroke: color("--accent"), fill: color("--ok-bg"), width: 2 }], "");
    draw("chart-failures", [x, d.failure_rate], [{ label: "failed %", stroke: color("--bad"), width: 2, points: { show: true, size: 5 } }], "%");
    draw("chart-runtime", [x, d.p50, d.p95], [{ label: "p50 s", stroke: color("--run"), width: 2, points: { show: true, size: 5 } }, { label: "p95 s", stroke: color("--warn"), width: 2, points: { show: true, size: 5 } }], "");
    note.textContent = `${d.finished.toLocaleString()} finished task${d.finished === 1 ? "" : "s"} in the last ${range}, in buckets of ${d.bucket >= 3600 ? d.bucket / 3600 + " h" : d.bucket >= 60 ? d.bucket / 60 + " min" : d.bucket + " s"}${d.partial ? " (partial: too many tasks)" : ""}.`;
    const tbody = document.querySelector("#types-table tbody");
    tbody.replaceChildren(...(d.types.length ? d.types.map(row) : [S.el("tr", { class: "empty" }, S.el("td", { colspan: "4" }, "No finished tasks in this period."))]));
    document.body.dataset.chartsReady = "true";
  }

  document.querySelectorAll("[data-range]").forEach((b) => b.addEventListener("click", () => load(b.dataset.range)));
  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(() => load(current), 250); });
  setInterval(() => { if (!document.hidden) load(current); }, 30000);
  load(current);
})();
