"""Artifact store: the same tests on a local folder, fsspec's memory file system and a real S3
server (moto, on a free local port), plus checkpoints moving from one machine to another."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from stepstream_service.store import artifacts
from stepstream_service.store.artifacts import (
    ArtifactError,
    ArtifactStore,
    pull_checkpoint,
    push_checkpoint,
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


def fake_checkpoint(workdir: Path, step: int, keep: int = 2) -> bytes:
    """Write a checkpoint the way the trainer does: the file, then the marker, then prune."""
    folder = workdir / "checkpoints"
    data = os.urandom(1000 + step)
    write_bytes(folder / f"step-{step:09d}.keras", data)
    (folder / "latest.json").write_text(
        json.dumps({"step": step, "file": f"step-{step:09d}.keras"})
    )
    for old in sorted(folder.glob("step-*.keras"))[:-keep]:
        old.unlink()
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
    assert writes[:2] == [f"{prefix}/step-000000010.keras", f"{prefix}/latest.json"]
    assert sorted(store._names(prefix)) == [
        "latest.json",
        "step-000000030.keras",
        "step-000000040.keras",
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


def test_pull_refuses_a_marker_pointing_elsewhere(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store()
    store.write_text("jobs/j1/checkpoints/latest.json", '{"step": 5, "file": "../../evil"}')
    with pytest.raises(ArtifactError, match="malformed"):
        pull_checkpoint(store, tmp_path / "w", "j1")
    assert not (tmp_path / "w" / "checkpoints").exists()


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
    assert store.read_text("jobs/j1/checkpoints/latest.json") == json.dumps(
        {"step": 10, "file": "step-000000010.keras"}
    )
    # The same layout through a file:// URL, and a missing checkpoint there.
    as_url = ArtifactStore(f"file://{tmp_path}/data")
    assert pull_checkpoint(as_url, workdir, "j1") == 10
    assert pull_checkpoint(as_url, tmp_path / "data" / "jobs" / "j2", "j2") is None
    with pytest.raises(ArtifactError, match="not found"):
        as_url.get("jobs/j2/model.keras", tmp_path / "data" / "jobs" / "j2" / "model.keras")
