"""Every Prometheus metric of the service, on an injected registry.

The per-job gauges are set by the event tail from the same events the WatchJob streams carry,
so a scrape and a watcher always agree.
"""

from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stepstream.kernel.states import TERMINAL

# Series that exist from the start, at 0, so the first failure of a kind shows in increase().
_REASONS = (
    "non_finite_loss",
    "max_duration_exceeded",
    "out_of_memory",
    "worker_lost",
    "dataset_unavailable",
    "dataset_invalid",
    "invalid_spec",
    "no_gpu",
    "storage_quota_exceeded",
    "internal_error",
)
_DURATIONS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
_WAITS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 1800)


class Metrics:
    """`job_names`: per-job series carry the job's name beside its id; without, the id only
    (a name can say more about a tenant's work than whoever scrapes should learn)."""

    def __init__(self, registry: CollectorRegistry, *, job_names: bool = True):
        self.registry = registry
        self.job_names = job_names
        _JOB = ("job_id", "name") if job_names else ("job_id",)
        self.job_loss = Gauge(
            "trainer_job_loss", "Batch loss of the job's last step.", _JOB, registry=registry
        )
        self.job_accuracy = Gauge(
            "trainer_job_accuracy",
            "Batch accuracy of the last step (classification jobs).",
            _JOB,
            registry=registry,
        )
        self.job_mae = Gauge(
            "trainer_job_mae",
            "Batch mean absolute error of the last step (regression jobs).",
            _JOB,
            registry=registry,
        )
        self.job_step = Gauge(
            "trainer_job_step", "Last step the job reported.", _JOB, registry=registry
        )
        self.job_steps_per_second = Gauge(
            "trainer_job_steps_per_second",
            "Training throughput of the job's last window.",
            _JOB,
            registry=registry,
        )
        self.submissions = Counter(
            "trainer_job_submissions_total", "Jobs created.", registry=registry
        )
        self.completions = Counter(
            "trainer_job_completions_total",
            "Jobs that ended, by state.",
            ("state",),
            registry=registry,
        )
        self.failures = Counter(
            "trainer_job_failures_total", "Failed jobs by reason.", ("reason",), registry=registry
        )
        self.retries = Counter(
            "trainer_job_retries_total",
            "Jobs requeued after their worker was lost.",
            registry=registry,
        )
        self.queue_wait = Histogram(
            "trainer_job_queue_wait_seconds",
            "From queued to running.",
            buckets=_WAITS,
            registry=registry,
        )
        self.job_duration = Histogram(
            "trainer_job_duration_seconds",
            "From running to a terminal state.",
            buckets=_DURATIONS,
            registry=registry,
        )
        self.step_time = Histogram(
            "trainer_step_time_seconds",
            "Seconds per training step, observed once per window.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "trainer_queue_depth", "Jobs by state.", ("state",), registry=registry
        )
        self.workers = Gauge(
            "trainer_workers", "Worker processes by status.", ("status",), registry=registry
        )
        self.experiment_trials = Gauge(
            "trainer_experiment_trials",
            "Trials of each running experiment by state.",
            ("experiment_id", "state"),
            registry=registry,
        )
        self.experiment_best = Gauge(
            "trainer_experiment_best_objective",
            "The best objective value of each running experiment's trials so far.",
            ("experiment_id",),
            registry=registry,
        )
        for state in TERMINAL:
            self.completions.labels(state.value)
        for reason in _REASONS:
            self.failures.labels(reason)
        self._ended: dict[tuple[str, ...], float] = {}

    def job_progress(
        self,
        job_id: str,
        name: str,
        step: int,
        loss: float,
        accuracy: float | None,
        mae: float | None,
        steps_per_second: float,
    ) -> None:
        key = self._key(job_id, name)
        self.job_step.labels(*key).set(step)
        self.job_loss.labels(*key).set(loss)
        if accuracy is not None:
            self.job_accuracy.labels(*key).set(accuracy)
        if mae is not None:
            self.job_mae.labels(*key).set(mae)
        self.job_steps_per_second.labels(*key).set(steps_per_second)

    def _key(self, job_id: str, name: str) -> tuple[str, ...]:
        return (job_id, name) if self.job_names else (job_id,)

    def job_ended(self, job_id: str, name: str) -> None:
        self._ended[self._key(job_id, name)] = time.monotonic()

    def forget_ended(self, linger_seconds: float) -> None:
        """Drop per-job series a while after the job ended, so the scrape stays small."""
        now = time.monotonic()
        for key, ended in list(self._ended.items()):
            if now - ended >= linger_seconds:
                for gauge in (
                    self.job_loss,
                    self.job_accuracy,
                    self.job_mae,
                    self.job_step,
                    self.job_steps_per_second,
                ):
                    with contextlib.suppress(KeyError):  # never set (e.g. no accuracy)
                        gauge.remove(*key)
                del self._ended[key]


class WorkerHostMetrics:
    """A worker machine's own series (`trainer worker --metrics-port`): its worker processes
    and how often they had to be restarted. Jobs' values come from the API servers."""

    def __init__(self, registry: CollectorRegistry):
        self.processes = Gauge(
            "trainer_worker_processes",
            "Worker processes on this machine by device kind and liveness.",
            ("device", "state"),
            registry=registry,
        )
        self.restarts = Counter(
            "trainer_worker_restarts_total",
            "Worker processes started again after they died.",
            registry=registry,
        )
