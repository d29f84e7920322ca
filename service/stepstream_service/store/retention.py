"""Retention: finished jobs, their events and their artifacts go after an age or beyond a
count. Queued and running jobs are never touched (the store checks the state as it deletes).
Uploads cut off part-way go once untouched for upload_resume_hours."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from stepstream_service.config import Settings
from stepstream_service.store import Store
from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.quota import PARTIAL_UPLOADS

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


def sweep_partial_uploads(settings: Settings, now: float | None = None) -> list[Path]:
    """Delete the uploads cut off part-way (every tenant's) that no stream has written to for
    upload_resume_hours; a resume after that starts again from the first byte."""
    cutoff = (now if now is not None else time.time()) - settings.upload_resume_hours * 3600
    removed = []
    for path in (settings.data_dir / "uploads").rglob(PARTIAL_UPLOADS):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # finished, or swept, meanwhile
            continue
    if removed:
        log.info("retention: %d upload(s) cut off part-way deleted", len(removed))
    return removed
