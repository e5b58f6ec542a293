"""A custom dashboard for Stamen: one page and one API route for a family of tasks.

Copy into your ``flowerconfig.py`` (or load it with ``stamen --conf=this_file.py``) and set
``FAMILY`` to your own task names. It adds:

* ``/family``: the latest tasks of the family, newest first, in Stamen's layout, with a
  count per state; ``/family?state=FAILURE`` shows only the failures;
* ``/api/family``: the same as JSON, for scripts and other dashboards.

Both are protected like every Stamen page and API route (``--basic_auth``, ``--auth``,
``--api_tokens``; the API route also honours ``FLOWER_UNAUTHENTICATED_API``), and both
honour ``--url_prefix``. Reading the history is a blocking SQLite query, so it runs in the
thread pool, as Stamen's own pages do.

Flower ignores ``stamen_routes``, so the same file still works with Flower.
"""

from collections import Counter

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from stamen.store.reader import TaskQuery
from stamen.web.extensions import render_page

# The tasks this dashboard is about (exact Celery task names).
FAMILY = ["etl.extract", "etl.transform", "etl.load"]
PAGE_SIZE = 100

PAGE = """
<div class="page-head"><h1>{{ title }}</h1></div>
<p>
  {% for state, count in counts.items() %}
    <a class="button" href="{{ base }}/family?state={{ state }}">{{ state }}: {{ count }}</a>
  {% endfor %}
  <a class="button" href="{{ base }}/family">all</a>
</p>
<div class="table-wrap"><table class="data">
  <thead><tr><th>Task</th><th>UUID</th><th>State</th><th>Worker</th><th>Runtime</th></tr></thead>
  <tbody>
  {% for t in tasks %}
    <tr>
      <td>{{ t.name }}</td>
      <td><a href="{{ base }}/task/{{ t.uuid }}">{{ t.uuid }}</a></td>
      <td>{{ t.state }}</td>
      <td>{{ t.worker or "" }}</td>
      <td>{{ "%.3f s" % t.runtime if t.runtime is not none else "" }}</td>
    </tr>
  {% else %}
    <tr><td colspan="5">No task of this family yet.</td></tr>
  {% endfor %}
  </tbody>
</table></div>
"""


def family_tasks(reader, state=None):
    """The newest ``PAGE_SIZE`` tasks of the family, and a count per state of all of them."""
    tasks, counts = [], Counter()
    for name in FAMILY:
        tasks += reader.list_tasks(
            TaskQuery(
                taskname=name, state=state, sort_by="received", descending=True, limit=PAGE_SIZE
            )
        )
        for task_state in reader.states():
            n = reader.count_tasks(TaskQuery(taskname=name, state=task_state))
            if n:
                counts[task_state] += n
    tasks.sort(key=lambda t: t.get("received") or 0, reverse=True)
    return tasks[:PAGE_SIZE], dict(sorted(counts.items()))


def stamen_routes(router, services):
    """Stamen calls this once at startup (see docs/extending.md)."""

    @router.get("/family")
    async def family_page(request: Request, state: str | None = None):
        tasks, counts = await run_in_threadpool(family_tasks, services.reader, state)
        return render_page(request, "Task family", PAGE, tasks=tasks, counts=counts)

    @router.get("/api/family", summary="Tasks of the family (custom route)")
    async def family_api(state: str | None = None):
        tasks, counts = await run_in_threadpool(family_tasks, services.reader, state)
        return {"family": FAMILY, "counts": counts, "tasks": tasks}
