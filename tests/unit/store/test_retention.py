"""Retention deletes finished jobs with their events and artifacts, and nothing live."""

from __future__ import annotations

from stepstream_service.config import Settings
from stepstream_service.store import JobState, NewJob, Store
from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.retention import prune


def test_prune_takes_the_rows_events_and_artifacts_of_finished_jobs_only(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    done, live = [], None
    for name in ("a", "b", "live"):
        job, _ = store.create_job(NewJob(name=name))
        claimed = store.claim("w", 30)
        (settings.job_dir(job.id)).mkdir(parents=True)
        artifacts.write_text(f"jobs/{job.id}/model.keras", "weights")
        if name == "live":
            live = claimed
        else:
            store.finish(claimed.id, "w", JobState.SUCCEEDED)
            done.append(job)
    removed = prune(settings, keep_last=0, store=store, artifacts=artifacts)
    assert sorted(removed) == sorted(j.id for j in done)
    for job in done:
        assert not artifacts.exists(f"jobs/{job.id}/model.keras")
        assert not settings.job_dir(job.id).exists()
        assert store.read_events(job.id) == []
    assert artifacts.exists(f"jobs/{live.id}/model.keras")
    assert store.get_job(live.id).state == JobState.RUNNING
    store.close()


def test_trainer_prune_needs_a_rule(capsys):
    from stepstream.cli import main

    assert main(["prune"]) == 2
    assert "--older-than-days" in capsys.readouterr().err


def test_uploads_cut_off_part_way_go_once_past_resuming(tmp_path):
    import os
    import time

    from stepstream_service.store.retention import sweep_partial_uploads

    settings = Settings(data_dir=tmp_path, upload_resume_hours=2)
    folder = tmp_path / "uploads" / "team-a"
    folder.mkdir(parents=True)
    old, fresh, kept = (
        folder / ".old.csv.0123456789abcdef.900.resumable",
        folder / ".fresh.csv.0123456789abcdef.900.resumable",
        folder / "done.csv",
    )
    for path in (old, fresh, kept):
        path.write_bytes(b"x" * 100)
    three_hours_ago = time.time() - 3 * 3600
    os.utime(old, (three_hours_ago, three_hours_ago))
    os.utime(kept, (three_hours_ago, three_hours_ago))
    assert sweep_partial_uploads(settings) == [old]
    assert not old.exists() and fresh.exists() and kept.exists()
