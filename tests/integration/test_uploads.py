"""Uploads through a real server: `trainer upload` a CSV that scikit-learn ships, train it to
SUCCEEDED; an upload cut off part-way resumes from what the server holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import sklearn

from stepstream import uploads
from stepstream.client import TrainingClient
from stepstream.kernel.spec import JobSpec, load_spec
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc

from .conftest import ServiceProcess, service_env

IRIS = Path(sklearn.__file__).parent / "datasets" / "data" / "iris.csv"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    svc = ServiceProcess(folder / "data", workers=1, store=f"sqlite:///{folder / 't.db'}")
    yield svc
    svc.stop()


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stepstream.cli", *args, "--address", server.address],
        capture_output=True,
        text=True,
        timeout=120,
        env=service_env(),
    )


def test_trainer_upload_then_train_the_csv(server, tmp_path):
    out = cli(server, "upload", str(IRIS))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "uploads/iris.csv"
    job = tmp_path / "iris.yaml"
    job.write_text(
        "model: {architecture: mlp, hidden_units: [8]}\n"
        "dataset: {name: csv, path: uploads/iris.csv, label: species, stream: true,\n"
        "  column_names: [sl, sw, pl, pw, species], validation_split: 0.2}\n"
        "training: {steps: 50, batch_size: 16, eval_every: 50}\n"
    )
    with TrainingClient(server.address) as client:
        info = client.submit(load_spec(job)).wait(timeout=120)
    assert info.state.name == "SUCCEEDED", info


def test_an_interrupted_upload_resumes_where_it_stopped(server, tmp_path):
    big = tmp_path / "wine.csv"
    head, rows = (IRIS.parent / "wine_data.csv").read_text().split("\n", 1)
    big.write_text(head + "\n" + rows * 20)  # a few hundred KiB: several chunks
    h = uploads.header(big, "csv", "wine")
    chunk = 16 * 1024
    cut = 5

    def first_chunks():
        for i, part in enumerate(uploads.parts(h, big, chunk, None)):
            if i > cut:
                return  # the stream ends part-way, as a dropped connection ends it
            yield part

    with grpc.insecure_channel(server.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.RpcError, match=f"resume from {cut * chunk}"):
            stub.UploadDataset(first_chunks())
        held = stub.GetUploadProgress(pb.GetUploadProgressRequest(header=h))
    assert held.received_bytes == cut * chunk and not held.HasField("dataset")

    seen = []
    with TrainingClient(server.address) as client:
        dataset = client.upload(big, "wine", chunk_size=chunk, progress=lambda d, t: seen.append(d))
        again = client.upload(big, "wine")  # whole already: nothing sent
    assert seen[0] == cut * chunk and seen[-1] == big.stat().st_size
    assert dataset.sha256 == h.sha256 == again.sha256
    kept = server.data_dir / dataset.path
    assert kept.read_bytes() == big.read_bytes()
    assert not list(kept.parent.glob(".*.resumable"))


def test_a_bad_upload_is_refused_and_a_folder_goes_as_a_tar(server, tmp_path):
    empty = tmp_path / "bad.csv"
    empty.write_text("just one line\n")
    out = cli(server, "upload", str(empty))
    assert out.returncode != 0 and "holds 1 line" in out.stderr
    pics = tmp_path / "pics"
    for cls in ("a", "b"):
        (pics / cls).mkdir(parents=True)
        shutil.copy(Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg", pics / cls)
    out = cli(server, "upload", str(pics))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "uploads/pics.tar"


def test_a_file_job_naming_no_upload_is_refused_at_submit(server):
    base = {
        "model": {"architecture": "mlp"},
        "dataset": {"name": "parquet", "path": "uploads/never-sent.parquet"},
    }
    glob = {**base, "dataset": {"name": "csv", "path": "uploads/never-*.csv"}}
    test = {**base, "dataset": {"name": "csv", "path": "uploads/iris*.csv", "test_path": "x.csv"}}
    with TrainingClient(server.address) as client:
        client.upload(IRIS, "iris")
        for spec, field in ((base, "path"), (glob, "path"), (test, "test_path")):
            with pytest.raises(grpc.RpcError) as err:
                client.submit(JobSpec.model_validate(spec))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"spec.dataset.{field}" in err.value.details(), err.value.details()
        assert "uploads/iris.csv" in err.value.details()  # what a csv job could read


def test_backbone_weights_upload_then_train_from_them(server, tmp_path):
    """A MobileNetV2 .weights.h5 uploaded, a frozen-backbone job started from it: the trained
    model's backbone holds exactly the uploaded weights. A CSV renamed .weights.h5 is refused."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(7)
    made = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    file = tmp_path / "mnv2.weights.h5"
    made.save_weights(file)
    fake = tmp_path / "fake.weights.h5"
    shutil.copy(IRIS, fake)
    with TrainingClient(server.address) as client:
        sent = client.upload(file)
        assert sent.path == "uploads/mnv2.weights.h5"
        with pytest.raises(grpc.RpcError) as err:
            client.upload(fake)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an HDF5 file" in err.value.details(), err.value.details()
        spec = JobSpec.model_validate(
            {
                "model": {
                    "architecture": "backbone",
                    "name": "mobilenet_v2",
                    "weights": sent.path,
                    "trainable": False,
                },
                "dataset": {"name": "synthetic_images", "image_size": 32, "num_samples": 32},
                "training": {"steps": 2, "batch_size": 8},
            }
        )
        job = client.submit(spec)
        assert job.wait(timeout=180).state.name == "SUCCEEDED"
        trained = keras.saving.load_model(job.download_model(tmp_path / "m.keras"))
    got = trained.get_layer("backbone").get_weights()
    want = made.get_weights()
    assert len(got) == len(want) and all(
        np.array_equal(g, w) for g, w in zip(got, want, strict=True)
    )


def test_a_two_input_two_output_config_trains_from_an_uploaded_npz(server, tmp_path):
    """Named arrays (x_train:<input>, y_train:<output>) uploaded and trained; an npz that
    lacks one is refused at submit, naming the array."""
    from tests.unit.engine.test_keras_multi_io import job, named_npz

    with TrainingClient(server.address) as client:
        sent = client.upload(named_npz(tmp_path / "two.npz"))
        info = client.submit(job(sent.path)).wait(timeout=120)
        assert info.state.name == "SUCCEEDED", info
        short = client.upload(named_npz(tmp_path / "short.npz", drop="y_train:sign"))
        with pytest.raises(grpc.RpcError) as err:
            client.submit(job(short.path))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no array y_train:sign for the model's output 'sign'" in err.value.details()
