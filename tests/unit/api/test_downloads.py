"""What DownloadModel and DownloadArtifacts send, without a server: a model that cannot be
converted is FAILED_PRECONDITION saying why (never INTERNAL), an unknown format or kind names
the valid ones, and the TensorBoard folder travels as one tar."""

from __future__ import annotations

import tarfile
from types import SimpleNamespace

import grpc
import pytest

from stepstream_service.api.downloads import Downloads
from stepstream_service.api.errors import InvalidArgument, status_for
from stepstream_service.store import JobState
from stepstream_service.store.artifacts import ArtifactStore


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def job(model_path: str | None = "jobs/job-1/model.keras"):
    return SimpleNamespace(id="job-1", name="seed", model_path=model_path, state=JobState.SUCCEEDED)


def test_a_model_that_cannot_be_converted_is_a_failed_precondition(store):
    store.write_text("jobs/job-1/model.keras", "not a model")
    with pytest.raises(Exception) as refused:
        Downloads(store, export_seconds=120).model(job(), "onnx")
    assert status_for(refused.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "could not be exported to onnx" in str(refused.value)
    assert not store.exists("jobs/job-1/exports/model.onnx")  # nothing half-made is kept


def test_the_keras_model_needs_no_conversion_and_unknown_formats_are_named(store):
    store.write_text("jobs/job-1/model.keras", "a model")
    downloads = Downloads(store, export_seconds=1)
    assert downloads.model(job(), "") == ("jobs/job-1/model.keras", "seed.keras")
    with pytest.raises(InvalidArgument, match="keras, onnx, saved_model, tflite"):
        downloads.model(job(), "pb")
    with pytest.raises(Exception) as missing:
        downloads.model(job(model_path=None), "onnx")
    assert status_for(missing.value) == grpc.StatusCode.FAILED_PRECONDITION


def test_the_tensorboard_folder_is_sent_as_one_tar(store, tmp_path):
    store.write_text("jobs/job-1/tensorboard/events.out.tfevents.1.host", "events")
    store.write_text("jobs/job-1/tensorboard/events.out.tfevents.0.graph", "graph")
    downloads = Downloads(store, export_seconds=1)
    f, size, filename = downloads.artifacts_tar(job(), "")
    assert filename == "seed.tensorboard.tar" and size == len(f.read())
    f.seek(0)
    with f, tarfile.open(fileobj=f) as tar:
        assert sorted(tar.getnames()) == [
            "events.out.tfevents.0.graph",
            "events.out.tfevents.1.host",
        ]
        assert tar.extractfile("events.out.tfevents.1.host").read() == b"events"
    with pytest.raises(InvalidArgument, match="use tensorboard"):
        downloads.artifacts_tar(job(), "checkpoints")
