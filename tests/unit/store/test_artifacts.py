"""Artifact store: the same tests on a local folder, fsspec's memory file system and a real S3
server (moto, on a free local port), plus checkpoints moving from one machine to another."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from stepstream_service.store import artifacts
from stepstream_service.store.artifacts import (
    ArtifactError,
    ArtifactStore,
    CheckpointScan,
    pull_checkpoint,
    push_checkpoint,
    record_checkpoint,
    sha256_of,
)
from tests.conftest import BUCKET

MakeStore = Callable[..., ArtifactStore]


@pytest.fixture(params=["local", "memory", "s3"])
def make_store(request, tmp_path: Path) -> MakeStore:
    """A factory of stores on one fresh root. `machine="b"` gives another instance on the same
    root that shares no cache with the first, as a process on another machine would."""
    root = f"t-{uuid.uuid4().hex[:10]}"
    if request.param == "local":
        url, options = str(tmp_path / "store"), {}
    elif request.param == "memory":
        url, options = f"memory://{root}", {}
    else:
        url, options = f"s3://{BUCKET}/{root}", dict(request.getfixturevalue("s3"))

    def make(machine: str = "a") -> ArtifactStore:
        extra = {"skip_instance_cache": True} if machine != "a" and options else {}
        return ArtifactStore(url, {**options, **extra})

    return make


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fake_checkpoint(workdir: Path, step: int) -> bytes:
    """Write a checkpoint the way the trainer does: the file, then its checksum and the marker,
    then prune."""
    folder = workdir / "checkpoints"
    data = os.urandom(1000 + step)
    write_bytes(folder / f"step-{step:09d}.keras", data)
    record_checkpoint(folder, step)
    return data


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part")) if folder.exists() else []


# ------------------------------------------------------------------------------------ addressing


def test_urls_are_normalised(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = ArtifactStore("data/")
    assert local.url == str(tmp_path / "data")
    assert local.local_root == tmp_path / "data"
    assert local.describe("jobs/j1/model.keras") == f"{tmp_path}/data/jobs/j1/model.keras"
    as_url = ArtifactStore(f"file://{tmp_path}/data/")
    assert as_url.local_root == tmp_path / "data"
    assert as_url.describe("uploads/x.npz") == f"file://{tmp_path}/data/uploads/x.npz"
    memory = ArtifactStore("memory://somewhere/")
    assert memory.url == "memory://somewhere"
    assert memory.local_root is None


@pytest.mark.parametrize("key", ["", "/", "a/../b", "a//b", "./a", ".."])
def test_invalid_keys_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ArtifactError, match="invalid artifact key"):
        ArtifactStore(str(tmp_path)).exists(key)


def test_unknown_protocol_is_an_artifact_error() -> None:
    with pytest.raises(ArtifactError, match="nosuchproto://x"):
        ArtifactStore("nosuchproto://x")


# ------------------------------------------------------------------------------------ whole files


def test_put_get_round_trip(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store()
    data = os.urandom(200_000)
    source = write_bytes(tmp_path / "src" / "data.npz", data)
    store.put(source, "uploads/data.npz")
    assert store.exists("uploads/data.npz")
    # Another machine, and a folder that does not exist yet.
    out = make_store("b").get("uploads/data.npz", tmp_path / "b" / "deep" / "data.npz")
    assert out == tmp_path / "b" / "deep" / "data.npz"
    assert out.read_bytes() == data
    # Putting again replaces the object whole.
    store.put(write_bytes(source, b"second"), "uploads/data.npz")
    assert store.get("uploads/data.npz", out).read_bytes() == b"second"
    assert leftovers(tmp_path) == []


def test_get_missing_raises_and_leaves_local_file_alone(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = make_store()
    fresh = tmp_path / "out" / "model.keras"
    with pytest.raises(ArtifactError, match=r"artifact not found: .*jobs/nope/model\.keras"):
        store.get("jobs/nope/model.keras", fresh)
    assert not fresh.exists()
    existing = write_bytes(tmp_path / "out" / "old.keras", b"old model")
    with pytest.raises(ArtifactError, match=store.url):
        store.get("jobs/nope/model.keras", existing)
    assert existing.read_bytes() == b"old model"
    assert leftovers(tmp_path) == []


def test_interrupted_download_leaves_no_partial_file(
    make_store: MakeStore, tmp_path: Path, monkeypatch
) -> None:
    store = make_store()
    store.write_text("uploads/x.npz", "the whole dataset")
    target = write_bytes(tmp_path / "out" / "x.npz", b"previous")

    def half(_source, dest, *args, **kwargs):
        Path(dest).write_bytes(b"the who")
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(artifacts.shutil, "copyfile", half)  # the local store copies
    monkeypatch.setattr(store.fs, "get_file", half)  # the others download
    with pytest.raises(ArtifactError, match=r"cannot read .*uploads/x\.npz: connection reset"):
        store.get("uploads/x.npz", target)
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_put_missing_local_file_raises(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store()
    with pytest.raises(ArtifactError, match="no such file"):
        store.put(tmp_path / "absent.npz", "uploads/absent.npz")
    assert not store.exists("uploads/absent.npz")


def test_exists_size_delete(make_store: MakeStore) -> None:
    store = make_store()
    assert not store.exists("jobs/j1/model.keras")
    store.write_text("jobs/j1/model.keras", "x" * 1234)
    store.write_text("jobs/j1/checkpoints/latest.json", "{}")
    store.write_text("jobs/j2/model.keras", "other job")
    assert store.exists("jobs/j1/model.keras")
    assert store.size("jobs/j1/model.keras") == 1234
    with pytest.raises(ArtifactError, match="not found"):
        store.size("jobs/j1/absent")
    store.delete("jobs/j1/model.keras")
    assert not store.exists("jobs/j1/model.keras")
    store.delete("jobs/j1/model.keras")  # missing is fine
    store.delete("jobs/j1")  # a prefix goes with everything under it
    assert not store.exists("jobs/j1/checkpoints/latest.json")
    assert store.read_text("jobs/j2/model.keras") == "other job"


def test_text_round_trip(make_store: MakeStore) -> None:
    store = make_store()
    store.write_text("notes/a.json", '{"ü": 1}')
    assert make_store("b").read_text("notes/a.json") == '{"ü": 1}'
    with pytest.raises(ArtifactError, match="not found"):
        store.read_text("notes/absent.json")


def test_another_machine_sees_changes_despite_cached_listings(make_store: MakeStore) -> None:
    a, b = make_store(), make_store("b")
    a.write_text("jobs/j1/model.keras", "v1")
    assert a._names("jobs/j1") == ["model.keras"]  # a listing that s3fs now caches
    assert not a.exists("jobs/j1/other")
    b.write_text("jobs/j1/other", "new")
    b.delete("jobs/j1/model.keras")
    assert a.exists("jobs/j1/other")
    assert not a.exists("jobs/j1/model.keras")
    assert a.read_text("jobs/j1/other") == "new"


# ---------------------------------------------------------------------------------------- streams


def test_open_streams_in_chunks(make_store: MakeStore) -> None:
    store = make_store()
    data = os.urandom(3 * 2**20 + 17)
    with store.open("jobs/j1/model.keras", "wb") as f:
        for i in range(0, len(data), 2**20):
            f.write(data[i : i + 2**20])
    assert store.size("jobs/j1/model.keras") == len(data)
    chunks = []
    with make_store("b").open("jobs/j1/model.keras") as f:
        while chunk := f.read(256 * 1024):
            chunks.append(chunk)
    assert len(chunks) > 1
    assert b"".join(chunks) == data


def test_failed_upload_publishes_nothing(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store()
    store.write_text("uploads/x.npz", "complete")
    with pytest.raises(RuntimeError), store.open("uploads/x.npz", "wb") as f:
        f.write(b"half of it")
        raise RuntimeError("client went away")
    assert store.read_text("uploads/x.npz") == "complete"
    with pytest.raises(RuntimeError), store.open("uploads/new.npz", "wb") as f:
        f.write(b"half of it")
        raise RuntimeError("client went away")
    assert not store.exists("uploads/new.npz")
    assert leftovers(tmp_path) == []


def test_open_rejects_other_modes(make_store: MakeStore) -> None:
    with pytest.raises(ValueError, match="unsupported mode"):
        make_store().open("a", "ab")


def test_open_missing_for_reading_raises(make_store: MakeStore) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        make_store().open("jobs/absent/model.keras")


# ------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_moves_to_another_machine(make_store: MakeStore, tmp_path: Path) -> None:
    machine_a, machine_b = tmp_path / "a" / "jobs" / "j1", tmp_path / "b" / "work"
    data = fake_checkpoint(machine_a, 20)
    push_checkpoint(make_store(), machine_a, "j1")
    assert pull_checkpoint(make_store("b"), machine_b, "j1") == 20
    got = machine_b / "checkpoints"
    assert (got / "step-000000020.keras").read_bytes() == data
    assert json.loads((got / "latest.json").read_text()) == json.loads(
        (machine_a / "checkpoints" / "latest.json").read_text()
    )
    # Again: the checkpoint is there already, nothing changes.
    before = (got / "step-000000020.keras").stat().st_mtime_ns
    assert pull_checkpoint(make_store("b"), machine_b, "j1") == 20
    assert (got / "step-000000020.keras").stat().st_mtime_ns == before
    assert leftovers(tmp_path) == []


def test_push_uploads_file_before_marker_and_prunes(
    make_store: MakeStore, tmp_path: Path, monkeypatch
) -> None:
    store = make_store()
    workdir = tmp_path / "w"
    writes: list[str] = []
    put, write_text = store.put, store.write_text
    monkeypatch.setattr(store, "put", lambda local, key: (writes.append(key), put(local, key)))
    monkeypatch.setattr(
        store, "write_text", lambda key, text: (writes.append(key), write_text(key, text))
    )
    for step in (10, 20, 30, 40):
        fake_checkpoint(workdir, step)
        push_checkpoint(store, workdir, "j1")
    prefix = "jobs/j1/checkpoints"
    assert writes[0] == f"{prefix}/step-000000010.keras"
    assert writes[2] == f"{prefix}/latest.json"
    assert writes[1] == f"{prefix}/step-000000010.keras.sha256"
    assert sorted(store._names(prefix)) == [
        "latest.json",
        "step-000000030.keras",
        "step-000000030.keras.sha256",
        "step-000000040.keras",
        "step-000000040.keras.sha256",
    ]
    assert json.loads(store.read_text(f"{prefix}/latest.json"))["step"] == 40


def test_pull_without_remote_checkpoint(make_store: MakeStore, tmp_path: Path) -> None:
    assert pull_checkpoint(make_store(), tmp_path / "empty", "j1") is None
    assert not (tmp_path / "empty").exists()
    push_checkpoint(make_store(), tmp_path / "no-checkpoints", "j1")  # nothing written yet
    assert not make_store().exists("jobs/j1")


def test_pull_keeps_a_newer_local_checkpoint(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store()
    fake_checkpoint(tmp_path / "a", 10)
    push_checkpoint(store, tmp_path / "a", "j1")
    local = fake_checkpoint(tmp_path / "b", 30)  # the push of step 30 never happened
    assert pull_checkpoint(store, tmp_path / "b", "j1") == 30
    folder = tmp_path / "b" / "checkpoints"
    assert json.loads((folder / "latest.json").read_text())["step"] == 30
    assert (folder / "step-000000030.keras").read_bytes() == local
    assert not (folder / "step-000000010.keras").exists()


def test_pull_never_follows_a_marker_pointing_elsewhere(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = make_store()
    store.write_text("jobs/j1/checkpoints/latest.json", '{"step": 5, "file": "../../evil"}')
    assert pull_checkpoint(store, tmp_path / "w" / "j1", "j1") is None
    # Copied as it is, for the resume to report; nothing was fetched outside the folder.
    assert sorted(p.name for p in (tmp_path / "w").rglob("*") if p.is_file()) == ["latest.json"]
    scan = CheckpointScan(tmp_path / "w" / "j1" / "checkpoints")
    assert scan.existed and scan.newest_intact() is None
    assert scan.problems == ["the checkpoint marker latest.json is unreadable"]


def test_default_layout_copies_nothing(tmp_path: Path) -> None:
    """Root = data dir, workdir = data dir/jobs/<id>: the trainer's files are the artifacts."""
    store = ArtifactStore(str(tmp_path / "data"))
    workdir = tmp_path / "data" / "jobs" / "j1"
    data = fake_checkpoint(workdir, 10)
    model = write_bytes(workdir / "model.keras", b"model")
    before = {p: p.stat() for p in workdir.rglob("*")}

    push_checkpoint(store, workdir, "j1")
    assert pull_checkpoint(store, workdir, "j1") == 10
    store.put(model, "jobs/j1/model.keras")
    assert store.get("jobs/j1/model.keras", model) == model

    after = {p: p.stat() for p in workdir.rglob("*")}
    assert sorted(after) == sorted(before)
    for path, stat in before.items():
        assert (after[path].st_ino, after[path].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert (workdir / "checkpoints" / "step-000000010.keras").read_bytes() == data
    assert json.loads(store.read_text("jobs/j1/checkpoints/latest.json")) == {
        "step": 10,
        "file": "step-000000010.keras",
        "sha256": sha256_of(workdir / "checkpoints" / "step-000000010.keras"),
    }
    # The same layout through a file:// URL, and a missing checkpoint there.
    as_url = ArtifactStore(f"file://{tmp_path}/data")
    assert pull_checkpoint(as_url, workdir, "j1") == 10
    assert pull_checkpoint(as_url, tmp_path / "data" / "jobs" / "j2", "j2") is None
    with pytest.raises(ArtifactError, match="not found"):
        as_url.get("jobs/j2/model.keras", tmp_path / "data" / "jobs" / "j2" / "model.keras")


# ------------------------------------------------------------------------ checkpoint checksums


def test_a_checkpoint_is_sealed_with_its_sha256_and_old_ones_go_with_theirs(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    for step in (10, 20, 30):
        fake_checkpoint(workdir, step)
    folder = workdir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "latest.json",
        "step-000000020.keras",
        "step-000000020.keras.sha256",
        "step-000000030.keras",
        "step-000000030.keras.sha256",
    ]
    digest = sha256_of(folder / "step-000000030.keras")
    marker = json.loads((folder / "latest.json").read_text())
    assert marker == {"step": 30, "file": "step-000000030.keras", "sha256": digest}
    # The sha256sum format, so an operator can check a folder by hand.
    checked = subprocess.run(
        ["sha256sum", "-c", "step-000000030.keras.sha256"], cwd=folder, capture_output=True
    )
    assert checked.returncode == 0, checked.stderr
    scan = CheckpointScan(folder)
    assert list(scan.intact())[:1] == [(30, folder / "step-000000030.keras")]
    assert scan.resumed_from(30) == "resumed from checkpoint at step 30"
    assert leftovers(tmp_path) == []


def _two_checkpoints(tmp_path: Path) -> Path:
    for step in (10, 20):
        fake_checkpoint(tmp_path / "w", step)
    return tmp_path / "w" / "checkpoints"


def test_a_truncated_newest_checkpoint_falls_back_to_the_older(tmp_path: Path) -> None:
    folder = _two_checkpoints(tmp_path)
    newest = folder / "step-000000020.keras"
    newest.write_bytes(newest.read_bytes()[:500])
    scan = CheckpointScan(folder)
    assert scan.newest_intact() == 10
    assert scan.resumed_from(10) == (
        "checkpoint at step 20 is damaged (sha256 mismatch); resumed from checkpoint at step 10"
    )


def test_a_deleted_newest_checkpoint_is_said_missing(tmp_path: Path) -> None:
    folder = _two_checkpoints(tmp_path)
    (folder / "step-000000020.keras").unlink()
    (folder / "step-000000020.keras.sha256").unlink()  # only the marker still names it
    scan = CheckpointScan(folder)
    assert scan.newest_intact() == 10
    assert scan.problems == ["checkpoint at step 20 is missing"]


def test_an_unreadable_marker_does_not_hide_the_checkpoints(tmp_path: Path) -> None:
    folder = _two_checkpoints(tmp_path)
    (folder / "latest.json").write_text('{"step": 2')
    scan = CheckpointScan(folder)
    assert scan.newest_intact() == 20
    assert scan.resumed_from(20) == (
        "the checkpoint marker latest.json is unreadable; resumed from checkpoint at step 20"
    )


def test_a_checkpoint_without_a_recorded_sha256_is_not_trusted(tmp_path: Path) -> None:
    folder = _two_checkpoints(tmp_path)
    (folder / "step-000000010.keras.sha256").unlink()
    (folder / "step-000000020.keras.sha256").write_text("not a digest\n")
    # The marker still records the newest one's sha256: that is enough.
    assert CheckpointScan(folder).newest_intact() == 20
    (folder / "latest.json").unlink()
    scan = CheckpointScan(folder)
    assert scan.newest_intact() is None and scan.existed
    assert scan.resumed_from(None) == (
        "checkpoint at step 20 has no recorded sha256; checkpoint at step 10 has no recorded "
        "sha256; no intact checkpoint is left, so training starts from step 0"
    )


def test_no_checkpoint_folder_means_nothing_existed(tmp_path: Path) -> None:
    scan = CheckpointScan(tmp_path / "absent")
    assert not scan.existed and scan.newest_intact() is None and scan.problems == []


def test_pull_passes_over_a_damaged_remote_checkpoint(
    make_store: MakeStore, tmp_path: Path
) -> None:
    store = make_store()
    machine_a = tmp_path / "a"
    older = fake_checkpoint(machine_a, 10)
    push_checkpoint(store, machine_a, "j1")
    fake_checkpoint(machine_a, 20)
    push_checkpoint(store, machine_a, "j1")
    store.write_text("jobs/j1/checkpoints/step-000000020.keras", "half of it")
    machine_b = tmp_path / "b"
    assert pull_checkpoint(make_store("b"), machine_b, "j1") == 10
    folder = machine_b / "checkpoints"
    assert (folder / "step-000000010.keras").read_bytes() == older
    # The damaged one and the marker naming it came too: the resume says what it passed over.
    scan = CheckpointScan(folder)
    assert scan.newest_intact() == 10
    assert scan.problems == ["checkpoint at step 20 is damaged (sha256 mismatch)"]
    assert leftovers(tmp_path) == []


def test_a_checkpoint_past_the_stored_history_is_passed_over(
    make_store: MakeStore, tmp_path: Path
) -> None:
    """A worker that died after writing a checkpoint but before its steps' events reached the
    store: resuming there would leave those steps out of the history for good."""
    folder = _two_checkpoints(tmp_path)
    scan = CheckpointScan(folder, upto=15)
    assert scan.newest_intact() == 10
    assert scan.problems == ["checkpoint at step 20 is past the last step stored (15)"]
    assert CheckpointScan(folder, upto=20).newest_intact() == 20
    store = make_store()
    machine_a = tmp_path / "a"
    fake_checkpoint(machine_a, 10)
    push_checkpoint(store, machine_a, "j2")
    fake_checkpoint(machine_a, 20)
    push_checkpoint(store, machine_a, "j2")
    assert pull_checkpoint(make_store("b"), tmp_path / "b", "j2", upto=19) == 10


# ------------------------------------------------------------------------------ storage quota


def test_files_and_usage_measure_what_is_stored(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store()
    assert store.files("uploads/t") == {} and store.usage("jobs/none") == 0
    ten = write_bytes(tmp_path / "ten", b"x" * 10)
    for key in ("uploads/t/a.npz", "uploads/t/deeper/b.npz", "jobs/j/model.keras"):
        store.put(ten, key)
    store.put(write_bytes(tmp_path / "five", b"y" * 5), "jobs/j/checkpoints/step-1.keras")
    assert store.files("uploads/t") == {"a.npz": 10}  # the folder's own files only
    assert store.usage("jobs/j") == 15  # however deep
    assert make_store("b").usage("uploads") == 20


def test_a_save_cut_short_is_cleared_at_the_next_checkpoint(tmp_path: Path) -> None:
    folder = _two_checkpoints(tmp_path)
    write_bytes(folder / "step-000000030.partial.keras", b"half a model")  # the worker died
    assert CheckpointScan(folder).newest_intact() == 20  # never taken for a checkpoint
    fake_checkpoint(tmp_path / "w", 30)
    assert not (folder / "step-000000030.partial.keras").exists()


def test_a_folder_goes_to_the_store_and_back_to_another_machine(
    make_store: MakeStore, tmp_path: Path
) -> None:
    here = tmp_path / "a" / "tensorboard"
    write_bytes(here / "events.out.tfevents.1.host", b"steps")
    write_bytes(here / "events.out.tfevents.0.graph", b"graph")
    write_bytes(here / ".events.out.tfevents.1.host.partial", b"half")  # being replaced
    store = make_store()
    assert artifacts.push_folder(store, here, "jobs/j/tensorboard") == 2
    there = tmp_path / "b" / "tensorboard"
    other = make_store("b")
    assert artifacts.pull_folder(other, "jobs/j/tensorboard", there) == 2
    assert sorted(p.name for p in there.iterdir()) == sorted(
        ["events.out.tfevents.1.host", "events.out.tfevents.0.graph"]
    )
    assert (there / "events.out.tfevents.1.host").read_bytes() == b"steps"
    assert artifacts.pull_folder(other, "jobs/j/tensorboard", there) == 0  # nothing new
    # The store's own folder (the default layout): nothing to copy either way.
    home = store.local_path("jobs/j/tensorboard")
    if home is not None:
        assert artifacts.push_folder(store, home, "jobs/j/tensorboard") == 0
