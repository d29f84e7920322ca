"""Retention: finished jobs, their events and their artifacts go after an age or beyond a
count. Queued and running jobs are never touched (the store checks the state as it deletes)."""

from __future__ import annotations

import logging
import shutil
import time

from stepstream_service.config import Settings
from stepstream_service.store import Store
from stepstream_service.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)


def prune(
    settings: Settings,
    *,
    finished_before: float | None = None,
    keep_last: int | None = None,
    store: Store | None = None,
    artifacts: ArtifactStore | None = None,
) -> list[str]:
    own = store is None
    store = store or Store(settings.store_url)
    artifacts = artifacts or ArtifactStore(settings.artifacts_url, settings.artifact_options)
    try:
        removed = store.prune(finished_before=finished_before, keep_last=keep_last)
    finally:
        if own:
            store.close()
    for job_id in removed:
        # The rows are gone first: a half-pruned job is one with files and no row, which the
        # next prune cannot see, but which nothing can reach either.
        try:
            artifacts.delete(f"jobs/{job_id}")
        except Exception:
            log.warning("job %s: pruned, but its artifacts could not be deleted", job_id)
        shutil.rmtree(settings.job_dir(job_id), ignore_errors=True)
        log.info("job %s: pruned with its events and artifacts", job_id)
    return removed


def policy_cutoff(settings: Settings) -> float | None:
    if settings.retention_days is None:
        return None
    return time.time() - settings.retention_days * 86400
