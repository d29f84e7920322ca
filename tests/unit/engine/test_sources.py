"""engine.sources: a remote worker fetches what a job's paths name from the artifact store (a
key, a glob of shards, an image folder's .tar), and then reads it as a local worker does."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from stepstream.kernel.spec import JobSpec
from stepstream_service.engine import datasets, sources
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.store.artifacts import ArtifactStore
from tests.conftest import BUCKET


@pytest.fixture
def remote(s3) -> ArtifactStore:
    return ArtifactStore(f"s3://{BUCKET}/sources-{uuid.uuid4().hex[:10]}", dict(s3))


def put(store: ArtifactStore, tmp_path: Path, key: str, data: bytes) -> None:
    file = tmp_path / "staging" / key.replace("/", "_")
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(data)
    store.put(file, key)


def shard(rows: int, seed: int) -> bytes:
    x = np.random.default_rng(seed).standard_normal((rows, 3))
    lines = ["a,b,y"] + [f"{a:.3f},{b:.3f},{int(a + b > 0)}" for a, b, _ in x]
    return ("\n".join(lines) + "\n").encode()


def image_tar() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for label, cls in enumerate(("dark", "light")):
            for i in range(3):
                png = io.BytesIO()
                Image.fromarray(np.full((5, 6, 3), 200 * label, np.uint8)).save(png, "PNG")
                info = tarfile.TarInfo(f"{cls}/{i}.png")
                info.size = png.tell()
                png.seek(0)
                tar.addfile(info, png)
    return out.getvalue()


def test_shards_and_an_image_tar_reach_a_worker_from_s3(remote, tmp_path):
    data_dir = tmp_path / "worker"
    put(remote, tmp_path, "uploads/team-a/part-1.csv", shard(40, 1))
    put(remote, tmp_path, "uploads/team-a/part-2.csv", shard(30, 2))
    put(remote, tmp_path, "uploads/team-a/other.csv", shard(5, 3))
    put(remote, tmp_path, "uploads/team-a/pics.tar", image_tar())

    got = sources.fetch(remote, data_dir, "uploads/team-a/part-*.csv")
    assert [p.name for p in got] == ["part-1.csv", "part-2.csv"]
    assert sources.fetch(remote, data_dir, "uploads/team-a/part-*.csv") == []  # held already
    put(remote, tmp_path, "uploads/team-a/part-2.csv", shard(31, 2))  # sent anew
    assert [p.name for p in sources.fetch(remote, data_dir, "uploads/team-a/part-*.csv")] == [
        "part-2.csv"
    ]
    assert sources.fetch(remote, data_dir, "s3://elsewhere/x.csv") == []
    assert sources.fetch(remote, data_dir, "uploads/team-a/nothing-*.csv") == []

    paths = DataPaths(data_dir=data_dir, uploads=data_dir / "uploads")
    spec = JobSpec.model_validate(
        {
            "dataset": {"name": "csv", "path": "uploads/team-a/part-*.csv", "stream": True},
            "model": {"architecture": "mlp"},
        }
    )
    assert datasets.load(spec, paths).train_rows == 71

    assert len(sources.fetch(remote, data_dir, "uploads/team-a/pics.tar")) == 1
    pics = spec.model_copy(
        update={
            "dataset": spec.dataset.model_copy(
                update={"name": "image_folder", "path": "uploads/team-a/pics.tar", "image_size": 4}
            )
        }
    )
    loaded = datasets.load(pics, paths)
    assert loaded.num_classes == 2 and loaded.train_rows == 6
