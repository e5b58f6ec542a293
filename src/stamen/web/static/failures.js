/* Failures page: retry every failed task of a group's type in the period shown, after a dry
   run says how many that is. The search cannot match exception types, so a type failing in
   several ways is retried as a whole; the question says so. */
(function () {
  "use strict";
  const S = window.Stamen;
  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-retry-group]");
    if (!button) return;
    ev.preventDefault();
    const fields = { taskname: button.dataset.taskname, state: "FAILURE", received_start: button.dataset.since };
    button.disabled = true;
    try {
      const preview = JSON.parse(await S.sendRaw("POST", "/api/tasks/bulk/retry", { ...fields, dry_run: "true" }));
      if (!preview.count) { S.toast("No failed task of this group is left to retry."); return; }
      const question = `Retry ${preview.count} of ${preview.matched} failed ${button.dataset.taskname} task(s) received since ${button.dataset.since}, whatever their exception?`;
      if (!window.confirm(question)) return;
      S.toast(await S.send("POST", "/api/tasks/bulk/retry", fields));
    } catch (err) {
      S.toast(err.message, true);
    } finally {
      button.disabled = false;
    }
  });
})();
