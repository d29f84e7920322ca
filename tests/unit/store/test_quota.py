"""store.quota: a tenant's stored bytes (events, artifacts, uploads) against its quota."""

from __future__ import annotations

import json

import pytest

from stepstream_service.store import NewEvent, NewJob
from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.errors import StorageQuotaExceeded
from stepstream_service.store.quota import (
    check_quota,
    count_artifacts,
    stored_bytes,
    uploads_prefix,
)


def test_events_artifacts_and_uploads_count_to_their_tenant_only(store, tmp_path):
    artifacts = ArtifactStore(tmp_path / "artifacts")
    job, _ = store.create_job(NewJob(name="j", tenant="team-a"))
    other, _ = store.create_job(NewJob(name="k", tenant="team-b"))
    start = stored_bytes(store, artifacts, "team-a")  # its QUEUED and RUNNING state events
    assert start > 0
    claimed = store.claim("w", 30)
    assert claimed is not None and claimed.id == job.id
    running = stored_bytes(store, artifacts, "team-a")
    steps = [NewEvent("step", {"step": i, "loss": 0.5}) for i in range(1, 101)]
    store.append_events(job.id, "w", steps, {"step": 100})
    written = sum(len(json.dumps(e.payload)) for e in steps)
    assert stored_bytes(store, artifacts, "team-a") == running + written
    model = tmp_path / "model"
    model.write_bytes(b"m" * 1000)
    artifacts.put(model, f"jobs/{job.id}/model.keras")
    assert count_artifacts(store, artifacts, job.id) == 1000
    upload = tmp_path / "u.npz"
    upload.write_bytes(b"u" * 300)
    artifacts.put(upload, f"{uploads_prefix('team-a')}/u.npz")
    used = stored_bytes(store, artifacts, "team-a")
    assert used == running + written + 1000 + 300
    before_b = stored_bytes(store, artifacts, "team-b")
    assert before_b == store.get_job(other.id).stored_bytes  # none of team-a's bytes
    check_quota(store, artifacts, "team-a", used + 1)
    check_quota(store, artifacts, "team-a", 0)  # 0: no quota
    with pytest.raises(StorageQuotaExceeded, match=rf"{used} bytes.*{used}.*tenant_storage_bytes"):
        check_quota(store, artifacts, "team-a", used)


def test_without_authentication_uploads_are_in_the_uploads_folder(store, tmp_path):
    artifacts = ArtifactStore(tmp_path / "artifacts")
    assert uploads_prefix(None) == uploads_prefix("") == "uploads"
    upload = tmp_path / "u.npz"
    upload.write_bytes(b"u" * 50)
    artifacts.put(upload, "uploads/u.npz")
    artifacts.put(upload, "uploads/team-a/u.npz")  # a tenant's, from a server with tokens
    assert stored_bytes(store, artifacts, None) == 50


@pytest.mark.parametrize("same_folder", [False, True])
def test_an_upload_cut_off_part_way_counts_once(store, tmp_path, same_folder):
    data_dir = tmp_path / "data"
    artifacts = ArtifactStore(data_dir if same_folder else tmp_path / "artifacts")
    before = stored_bytes(store, artifacts, "team-a", data_dir)
    folder = data_dir / uploads_prefix("team-a")
    folder.mkdir(parents=True)
    (folder / ".big.csv.0123456789abcdef.9000.resumable").write_bytes(b"x" * 700)
    assert stored_bytes(store, artifacts, "team-a", data_dir) == before + 700
    assert stored_bytes(store, artifacts, "team-b", data_dir) == 0
