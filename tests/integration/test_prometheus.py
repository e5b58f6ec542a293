"""A real Prometheus server scrapes a real Stamen; the shipped rules and dashboard are checked.

Prometheus is Debian's ``prometheus`` package (``.ci/run`` installs it). It scrapes the
session's Redis-broker Stamen every second and evaluates ``deploy/prometheus/alerts.yml``,
so the rules are proven to parse (``promtool``) and to evaluate against our series. The
dashboard and the rules may only use metric names that a live ``/metrics`` exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import ROOT, Cluster, free_port, stop_process, wait_until

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
EXAMPLE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "stamen-dashboard.json"

#: Metric names in PromQL: ours and those of the collectors every scrape carries.
_METRIC = re.compile(r"\b((?:flower|stamen|celery|process|python)_[A-Za-z0-9_]*)")

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (.ci/run installs it)",
)


@pytest.fixture
def prometheus(redis_cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    """Prometheus scraping the session's Stamen every second, with our alert rules loaded."""
    port = free_port()
    target = redis_cluster.stamen.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        f"rule_files: [{json.dumps(str(ALERTS))}]\n"
        "scrape_configs:\n"
        "  - job_name: stamen\n"
        f"    static_configs: [{{targets: [{json.dumps(target)}]}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: proc.poll() is None and httpx.get(f"{url}/-/ready", timeout=2).is_success,
            timeout=60,
            what=f"prometheus ready ({tmp_path / 'prometheus.log'})",
        )
        yield url
    finally:
        stop_process(proc)
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def first_value(url: str, promql: str) -> float:
    result = query(url, promql)
    return float(result[0]["value"][1]) if result else 0.0


@needs_prometheus
def test_prometheus_scrapes_stamen(redis_cluster: Cluster, prometheus: str) -> None:
    task_id = redis_cluster.send("itest.add", 2, 3)
    redis_cluster.wait_state(task_id, "SUCCESS")
    worker = redis_cluster.worker.hostname
    succeeded = f'flower_events_total{{type="task-succeeded",task="itest.add",worker="{worker}"}}'
    wait_until(lambda: first_value(prometheus, succeeded) > 0, timeout=60, what=succeeded)
    assert first_value(prometheus, 'up{job="stamen"}') == 1
    assert first_value(prometheus, f'flower_worker_online{{worker="{worker}"}}') == 1
    assert first_value(prometheus, "flower_workers_online") >= 1
    assert first_value(prometheus, 'flower_tasks{state="SUCCESS"}') >= 1
    runtime = f'flower_task_runtime_seconds_count{{task="itest.add",worker="{worker}"}}'
    assert first_value(prometheus, runtime) >= 1
    # The worker's own queue is measured on the broker (Redis answers LLEN).
    queue = f'flower_queue_length{{queue="{redis_cluster.queue}"}}'
    wait_until(lambda: query(prometheus, queue), timeout=30, what=queue)

    def rules_evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = all(r.get("lastEvaluation", "").startswith("2") for r in rules)
        return rules if rules and done else []

    rules = wait_until(rules_evaluated, timeout=30, what="alert rules evaluated")
    assert len(rules) == 7
    assert {r["health"] for r in rules} == {"ok"}, rules


@needs_prometheus
def test_promtool_accepts_rules_and_example_config() -> None:
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(EXAMPLE_CONFIG)]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def exported_names(exposition: str) -> set[str]:
    """Every name a query can use: families plus histogram and counter sample suffixes."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(" ", 3)
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{s}" for s in ("bucket", "sum", "count", "created"))
        elif kind == "counter":
            names.add(name.removesuffix("_total") + "_created")
    return names


def used_names(text: str) -> set[str]:
    return set(_METRIC.findall(text))


def test_dashboard_and_rules_use_only_exported_metrics(redis_cluster: Cluster) -> None:
    response = redis_cluster.stamen.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain"
    exported = exported_names(response.text)

    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    expressions += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    in_dashboard = used_names("\n".join(expressions))
    assert in_dashboard, "no metric found in the dashboard"
    assert in_dashboard <= exported, sorted(in_dashboard - exported)

    # No YAML parser needed: outside comments, metric names only occur in expressions.
    lines = ALERTS.read_text().splitlines()
    in_rules = used_names("\n".join(ln for ln in lines if not ln.lstrip().startswith("#")))
    assert {"flower_worker_online", "flower_events_total", "flower_queue_length"} <= in_rules
    assert in_rules <= exported, sorted(in_rules - exported)


def parse_samples(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def test_idle_queue_length_and_oldest_message_age(redis_cluster: Cluster) -> None:
    """A queue nobody consumes, known only from task-sent events, is measured on Redis."""
    import redis

    queue = f"itest-idle-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_cluster.broker)
    try:
        redis_cluster.client.send_task("itest.add", args=(1, 2), queue=queue)
        key = (("queue", queue),)

        def measured() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            found = parse_samples(redis_cluster.stamen.get("/metrics").text)
            age = found.get(("flower_queue_oldest_message_age_seconds", key))
            return found if age is not None and age > 0 else None

        found = wait_until(measured, timeout=30, what=f"{queue} measured")
        assert found[("flower_queue_length", key)] == 1
    finally:
        client.delete(queue)
        client.close()
