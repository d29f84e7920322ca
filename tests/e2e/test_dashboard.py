"""End to end: a real Prometheus (Debian's package) scrapes a running service and a worker
machine on loopback while jobs run; every Grafana panel's PromQL then returns data, and the
job's loss in Prometheus equals the last loss its stream carried.

Set TRAINER_DASHBOARD_PNG=docs/dashboard.png to keep the rendered picture of the main panels.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from stepstream.client import TrainingClient
from stepstream.kernel.spec import load_spec
from tests.conftest import DIVERGING, EXAMPLES
from tests.integration.conftest import ServiceProcess, WorkerHost
from tests.integration.test_service import classes

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "trainer.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
# Grafana fills these in; here they become windows that cover the test's short run.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "10m"}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, folder: Path, targets: dict[str, str]):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: apt-get install prometheus", pytrace=False)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, folder / "rules.yml")
        scrape = [
            {"job_name": job, "scrape_interval": "1s", "static_configs": [{"targets": [target]}]}
            for job, target in targets.items()
        ]
        config = {"global": {"evaluation_interval": "1s"}, "rule_files": ["rules.yml"]}
        config["scrape_configs"] = scrape
        (folder / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (folder / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                break
            except OSError:
                assert self.proc.poll() is None, (folder / "prometheus.log").read_text()
                assert time.monotonic() < end, "prometheus did not become ready"
                time.sleep(0.2)

    def api(self, path: str, **params: object) -> dict:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{params}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def panel_queries(job_id: str) -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$job", job_id)  # ids are letters, digits and "-"
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            out.append((panel["title"], expr))
    return out


@pytest.fixture
def stack(tmp_path):
    store = f"sqlite:///{tmp_path / 'trainer.db'}"
    server = ServiceProcess(tmp_path / "server", workers=0, store=store, metrics_linger_seconds=600)
    worker = WorkerHost(tmp_path, "worker-machine", store, metrics=True)
    prometheus = Prometheus(
        tmp_path / "prometheus",
        {
            "trainer-server": server.metrics_url.split("/")[2],
            "trainer-worker": worker.metrics,
        },
    )
    yield server, prometheus
    prometheus.stop()
    worker.stop()
    server.stop()


def test_every_dashboard_panel_has_data_and_prometheus_agrees_with_the_stream(stack, tmp_path):
    server, prometheus = stack
    end = time.monotonic() + 120
    while not prometheus.query('trainer_workers{status="idle"} == 1'):
        assert time.monotonic() < end, "the worker never showed up idle in Prometheus"
        time.sleep(0.5)
    started = time.time()
    with TrainingClient(server.address) as client:
        # The seed MLP on Fashion-MNIST: long enough for curves, with two jobs queued behind.
        spec = load_spec(EXAMPLES / "mnist_mlp.yaml").model_copy(deep=True)
        spec.name, spec.training.steps, spec.training.eval_every = "seed-mlp", 3000, 1000
        job = client.submit(spec)
        also = client.submit(classes(300, "queued-behind"))
        failing = client.submit(DIVERGING)
        steps = [e for e in job.stream() if e.kind == "step"]
        assert failing.wait(timeout=120).state == "FAILED"
        assert job.info().state == also.wait(timeout=120).state == "SUCCEEDED"
    last = steps[-1]

    # Scrapes run every second: wait until Prometheus has the job's final values.
    end = time.monotonic() + 30
    while True:
        loss = prometheus.query(f'trainer_job_loss{{job_id="{job.id}"}}')
        accuracy = prometheus.query(f'trainer_job_accuracy{{job_id="{job.id}"}}')
        if loss and float(loss[0]["value"][1]) == last.loss and accuracy:
            break
        assert time.monotonic() < end, f"Prometheus has {loss}, the stream ended with {last.loss}"
        time.sleep(0.5)
    assert float(accuracy[0]["value"][1]) == last.accuracy
    time.sleep(3)  # a few more scrapes, so every rate() window holds two samples after the end

    empty = [(title, expr) for title, expr in panel_queries(job.id) if not prometheus.query(expr)]
    assert not empty, f"panels without data: {empty}"
    failures = prometheus.query(
        "max without (instance) (sum by (instance, reason) (trainer_job_failures_total)) > 0"
    )
    assert {r["metric"]["reason"]: r["value"][1] for r in failures} == {"non_finite_loss": "1"}
    rules = prometheus.api("rules")["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {
        "TrainerJobsFailingRepeatedly",
        "TrainerNoWorkers",
        "TrainerWorkerDown",
    }

    picture = Path(os.environ.get("TRAINER_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    render(prometheus, job.id, started, time.time(), picture)
    assert picture.stat().st_size > 10_000


def render(prometheus: Prometheus, job_id: str, start: float, end: float, path: Path) -> None:
    """The dashboard's main panels drawn from Prometheus's own query_range answers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wanted = [
        "Loss",
        "Accuracy (classification jobs)",
        "Step",
        "Queue depth by state",
        "Workers busy / idle",
        "Completions by state",
    ]
    panels = {}
    for title, expr in panel_queries(job_id):
        panels.setdefault(title, []).append(expr)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, title in zip(axes.flat, wanted, strict=True):
        for expr in panels[title]:
            series = prometheus.api("query_range", query=expr, start=start - 5, end=end, step="1s")[
                "result"
            ]
            for s in series:
                t = [float(v[0]) - start for v in s["values"]]
                y = [float(v[1]) for v in s["values"]]
                label = " ".join(v for k, v in sorted(s["metric"].items()) if k != "job_id")
                ax.plot(t, y, label=label or title)
        ax.set_title(title)
        ax.set_xlabel("seconds since submit")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    fig.suptitle("Training service dashboard: the main panels, from a real Prometheus")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
