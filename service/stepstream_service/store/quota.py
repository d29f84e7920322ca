"""A tenant's stored bytes against its quota (tenant_storage_bytes): what its jobs keep, events
and artifacts (jobs.stored_bytes), and its uploads (their sizes in the artifact store)."""

from __future__ import annotations

import sqlalchemy as sa

from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.database import Database
from stepstream_service.store.errors import StorageQuotaExceeded
from stepstream_service.store.schema import jobs


def uploads_prefix(tenant: str | None) -> str:
    """Where a tenant's uploads are kept; without authentication, in uploads/ itself."""
    return f"uploads/{tenant}" if tenant else "uploads"


def stored_bytes(store: Database, artifacts: ArtifactStore, tenant: str | None) -> int:
    """The bytes `tenant` keeps stored now (None or "": the server without authentication)."""
    total = sa.select(sa.func.coalesce(sa.func.sum(jobs.c.stored_bytes), 0))
    with store.reader.connect() as conn:
        kept = conn.execute(total.where(jobs.c.tenant == (tenant or ""))).scalar_one()
    return int(kept) + sum(artifacts.files(uploads_prefix(tenant)).values())


def check_quota(store: Database, artifacts: ArtifactStore, tenant: str | None, limit: int) -> None:
    """Raise StorageQuotaExceeded when `tenant` stores `limit` bytes or more (0: no quota)."""
    if limit <= 0:
        return
    used = stored_bytes(store, artifacts, tenant)
    if used >= limit:
        raise StorageQuotaExceeded(
            f"this tenant stores {used} bytes of events, models, checkpoints and uploads, at or "
            f"over its quota of {limit} bytes (tenant_storage_bytes); finished jobs and their "
            "files are deleted by retention or `trainer prune`"
        )


def count_artifacts(store: Database, artifacts: ArtifactStore, job_id: str) -> int:
    """Add what the job keeps in the artifact store (model, checkpoints) to its stored bytes,
    once, as it ends; returns the bytes added."""
    size = artifacts.usage(f"jobs/{job_id}")
    if size:
        with store.engine.begin() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(stored_bytes=jobs.c.stored_bytes + size)
            )
    return size
