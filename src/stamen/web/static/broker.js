/* Broker page: queue lengths every 5 seconds while the page is visible, drawn as a graph of
   the last 10 minutes and patched into the table. Queue lengths come from the broker, not
   from the event stream, so this page asks for them; one request covers every queue. */
(function () {
  "use strict";
  const S = window.Stamen;
  const EVERY_MS = 5000, KEEP = 120, WINDOW_S = KEEP * EVERY_MS / 1000;  // 10 minutes
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim() || "#888";
  const PALETTE = ["--accent", "--bad", "--warn", "--run", "--ok", "--muted"];
  const times = [];
  const counts = new Map();  // queue name -> lengths aligned with times (null: not reported)
  let plot = null, plotNames = "";

  function record(at, queues) {
    times.push(at);
    const seen = new Set();
    for (const q of queues) {
      if (!counts.has(q.name)) counts.set(q.name, new Array(times.length - 1).fill(null));
      counts.get(q.name).push(q.messages === null || q.messages === undefined ? null : Number(q.messages));
      seen.add(q.name);
    }
    for (const [name, values] of counts) if (!seen.has(name)) values.push(null);
    if (times.length > KEEP) { times.shift(); for (const values of counts.values()) values.shift(); }
  }

  // The caption's 10 minutes: from the first point until there are 10 minutes of them, then
  // the last 10. Read from the data: with a single point uPlot hands the range function
  // that point and one 1000 days later.
  function timeWindow(u, min, max) {
    const xs = u.data[0] || [];
    if (!xs.length) return [min, max];
    const first = xs[0], last = xs[xs.length - 1];
    return [Math.max(first, last - WINDOW_S), Math.max(last, first + WINDOW_S)];
  }

  function draw() {
    // Looked up every time: an action re-renders the page content, chart box included.
    const box = document.getElementById("queue-chart");
    if (!box || !window.uPlot) return;
    const names = [...counts.keys()].sort();
    const data = [times.slice(), ...names.map((n) => counts.get(n).slice())];
    if (plot && plot.root.parentNode === box && plotNames === names.join("\n")) {
      plot.setData(data);
    } else {
      if (plot) plot.destroy();
      const stroke = color("--muted"), grid = { stroke: color("--border"), width: 1 };
      const series = names.map((n, i) => ({ label: n, stroke: color(PALETTE[i % PALETTE.length]), width: 2, points: { show: true, size: 4 } }));
      plot = new uPlot({
        width: Math.max(box.clientWidth, 280), height: 200, series: [{}, ...series],
        axes: [{ stroke, grid, ticks: grid }, { stroke, grid, ticks: grid, size: 50 }],
        scales: {
          x: { time: true, range: timeWindow },
          y: { range: (u, min, max) => [0, Math.max(max || 0, 1)] },
        },
        legend: { live: true },
      }, data, box);
      plotNames = names.join("\n");
      box.uplot = plot;  // for tests and the curious: the chart of this box
    }
    box.dataset.points = String(times.length);
  }

  function patchTable(queues) {
    for (const q of queues) {
      const tr = document.querySelector(`#queues-table tr[data-queue="${CSS.escape(q.name)}"]`);
      if (!tr) continue;
      for (const key of ["messages", "messages_unacknowledged", "messages_ready", "consumers", "idle_since"]) {
        const cell = tr.querySelector(`[data-cell="${key}"]`);
        const value = q[key] === null || q[key] === undefined ? "—" : String(q[key]);
        if (cell && cell.textContent !== value) cell.textContent = value;
      }
    }
  }

  async function tick() {
    if (document.hidden || !document.getElementById("queue-chart")) return;
    try {
      const r = await fetch(S.url("/broker?json=1"), { credentials: "same-origin" });
      if (!r.ok) return;
      const d = await r.json();
      record(d.at, d.queues || []);
      patchTable(d.queues || []);
      draw();
    } catch (e) { /* the next tick tries again */ }
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(() => { if (plot) { plot.destroy(); plot = null; } draw(); }, 250); });
  tick();
  setInterval(tick, EVERY_MS);
})();
