"""A tenant's stored bytes against its quota (tenant_storage_bytes): what its jobs keep, events
and artifacts (jobs.stored_bytes), and its uploads (their sizes in the artifact store)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.database import Database
from stepstream_service.store.errors import StorageQuotaExceeded
from stepstream_service.store.schema import jobs


def uploads_prefix(tenant: str | None) -> str:
    """Where a tenant's uploads are kept; without authentication, in uploads/ itself."""
    return f"uploads/{tenant}" if tenant else "uploads"


PARTIAL_UPLOADS = ".*.resumable"  # an upload cut off part-way, kept for it to resume


def stored_bytes(
    store: Database, artifacts: ArtifactStore, tenant: str | None, data_dir: Path | None = None
) -> int:
    """The bytes `tenant` keeps stored now (None or "": the server without authentication);
    with `data_dir`, its uploads cut off part-way there too (kept on the server's disk until
    they resume, or retention deletes them)."""
    total = sa.select(sa.func.coalesce(sa.func.sum(jobs.c.stored_bytes), 0))
    with store.reader.connect() as conn:
        kept = conn.execute(total.where(jobs.c.tenant == (tenant or ""))).scalar_one()
    prefix = uploads_prefix(tenant)
    partial = 0
    if data_dir is not None:
        folder = data_dir / prefix
        held = artifacts.local_path(prefix)
        # The artifact store's own folder: its listing has counted them already.
        if held is None or held.resolve() != folder.resolve():
            partial = sum(p.stat().st_size for p in folder.glob(PARTIAL_UPLOADS) if p.is_file())
    return int(kept) + sum(artifacts.files(prefix).values()) + partial


def check_quota(
    store: Database,
    artifacts: ArtifactStore,
    tenant: str | None,
    limit: int,
    data_dir: Path | None = None,
) -> None:
    """Raise StorageQuotaExceeded when `tenant` stores `limit` bytes or more (0: no quota)."""
    if limit <= 0:
        return
    used = stored_bytes(store, artifacts, tenant, data_dir)
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
