"""The Prometheus files pass promtool (Debian's `prometheus` package): the scrape config, the
alert rules, and unit tests of those rules (tests/deploy/rules_test.yml)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: apt-get install prometheus", pytrace=False)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_the_scrape_config_is_valid():
    done = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_alert_rules_are_valid():
    done = promtool("check", "rules", str(PROMETHEUS / "rules.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_each_alert_fires_when_it_should_and_not_otherwise():
    done = promtool("test", "rules", str(Path(__file__).with_name("rules_test.yml")))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dashboard_uses_the_provisioned_datasource_and_covers_the_issue():
    dashboard = json.loads((GRAFANA / "dashboards" / "trainer.json").read_text())
    provisioned = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {"prometheus"} and "uid: prometheus" in provisioned
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "trainer_job_loss",
        "trainer_job_accuracy",
        "trainer_job_steps_per_second",
        "trainer_queue_depth",
        "trainer_job_queue_wait_seconds_bucket",
        "trainer_job_duration_seconds_bucket",
        "trainer_workers",
        "trainer_job_failures_total",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    (job,) = dashboard["templating"]["list"]
    assert job["name"] == "job" and 'job_id=~"$job"' in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
