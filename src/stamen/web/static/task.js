/* Task page: when this task changes state, swap in the fresh details (no full reload). */
(function () {
  "use strict";
  const S = window.Stamen;
  let swapping = false;
  function current() {
    const holder = document.getElementById("task-state");
    return holder ? { uuid: holder.dataset.uuid, state: holder.textContent.trim(), holder } : null;
  }
  if (!current()) return;
  S.on("tasks", (msg) => {
    const shown = current();
    if (!shown || swapping) return;
    const changed = (msg.tasks || []).find((t) => t.uuid === shown.uuid && t.state && t.state !== shown.state);
    if (!changed) return;
    swapping = true;
    shown.holder.replaceChildren(S.stateBadge(changed.state));
    // Re-render the details server-side (every field, the timeline) and swap them in.
    const done = () => { swapping = false; };
    if (window.htmx) {
      window.htmx.ajax("GET", location.pathname, { target: "#main-content", select: "#main-content", swap: "outerHTML" }).then(done, done);
    } else {
      done();
    }
  });
})();
