"""Per-job series: with or without the job's name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from stepstream_service.runtime.metrics import Metrics


def scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_job_names_can_be_left_out_of_the_labels():
    named = Metrics(CollectorRegistry())
    bare = Metrics(CollectorRegistry(), job_names=False)
    for metrics in (named, bare):
        metrics.job_progress("job-1", "secret-project", 5, 0.5, 0.9, None, 100.0)
    assert 'trainer_job_step{job_id="job-1",name="secret-project"} 5.0' in scrape(named)
    text = scrape(bare)
    assert 'trainer_job_step{job_id="job-1"} 5.0' in text
    assert "secret-project" not in text
    bare.job_ended("job-1", "secret-project")
    bare.forget_ended(0)
    assert "job-1" not in scrape(bare)
