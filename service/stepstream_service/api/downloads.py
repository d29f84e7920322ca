"""What DownloadModel and DownloadArtifacts send: a job's model in the format asked (converted
on the first download when the job did not export it, then kept beside model.keras), and the
files it wrote besides (its TensorBoard folder), as one tar.

The server never imports TensorFlow: a conversion runs `python -m
stepstream_service.engine.export` in a subprocess, bounded by `export_seconds`.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from stepstream.v1 import trainer_pb2 as pb
from stepstream_service.api.errors import FailedPrecondition, InvalidArgument
from stepstream_service.engine.export import ARTIFACTS, FORMATS
from stepstream_service.engine.tensorboard import FOLDER as TENSORBOARD
from stepstream_service.store import Job, JobFinished
from stepstream_service.store.artifacts import ArtifactStore

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
KINDS = ("tensorboard",)
# The file name a client is sent, after the job's display name.
SUFFIXES = {
    "keras": ".keras",
    "saved_model": ".saved_model.tar",
    "onnx": ".onnx",
    "tflite": ".tflite",
}


class ExportFailed(FailedPrecondition):
    reason = "export_failed"


class Downloads:
    def __init__(self, artifacts: ArtifactStore, export_seconds: float):
        self.artifacts = artifacts
        self.export_seconds = export_seconds
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    # ------------------------------------------------------------------------------ models

    def model(self, job: Job, fmt: str) -> tuple[str, str]:
        """(artifact key, file name) of `job`'s model in `fmt`, converting it first if needed."""
        fmt = (fmt or "keras").lower()
        if fmt not in FORMATS:
            raise InvalidArgument(
                "format", f"unknown format {fmt[:32]!r}; use {', '.join(sorted(FORMATS))}"
            )
        source = job.model_path
        if not source or not self.artifacts.exists(source):
            raise JobFinished(
                f"job {job.id} has no model to download (state {job.state.value}); "
                "a model exists once the job has SUCCEEDED"
            )
        filename = f"{job.name}{SUFFIXES[fmt]}"
        if fmt == "keras":
            return source, filename
        key = f"jobs/{job.id}/{ARTIFACTS[fmt]}"
        # One conversion per export at a time; whoever waited finds it made.
        with self._lock(key):
            if not self.artifacts.exists(key):
                self._convert(job, source, fmt, key)
        return key, filename

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    def _convert(self, job: Job, source: str, fmt: str, key: str) -> None:
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            model = self.artifacts.get(source, Path(tmp) / "model.keras")
            output = Path(tmp) / "out"
            command = [sys.executable, "-m", "stepstream_service.engine.export"]
            log.info("job %s: converting its model to %s", job.id, fmt)
            try:
                done = subprocess.run(
                    [*command, str(model), fmt, str(output)],
                    capture_output=True,
                    text=True,
                    timeout=self.export_seconds,
                    # On the CPU: a conversion must not take a GPU's memory from a worker.
                    env=_cpu_only(),
                )
            except subprocess.TimeoutExpired:
                raise ExportFailed(
                    f"job {job.id}: converting its model to {fmt} took longer than "
                    f"{self.export_seconds:g} s (export_seconds)"
                ) from None
            if done.returncode != 0 or not output.is_file():
                lines = [line for line in done.stderr.splitlines() if line.strip()]
                log.warning("job %s: export to %s failed:\n%s", job.id, fmt, done.stderr[-4000:])
                why = lines[-1].replace(tmp, "").strip()[:300] if lines else "no reason given"
                raise ExportFailed(f"job {job.id}: {why}")
            self.artifacts.put(output, key)

    # ------------------------------------------------------------------------------ artifacts

    def artifacts_tar(self, job: Job, kind: str) -> tuple[IO[bytes], int, str]:
        """A tar of the job's `kind` folder (a file object at its start, its size, its name).
        A job that wrote nothing yet gets an empty tar."""
        kind = kind or "tensorboard"
        if kind not in KINDS:
            raise InvalidArgument("kind", f"unknown kind {kind[:32]!r}; use {', '.join(KINDS)}")
        prefix = f"jobs/{job.id}/{TENSORBOARD}"
        out = tempfile.SpooledTemporaryFile(max_size=8 * CHUNK)  # noqa: SIM115 - the caller's
        with tarfile.open(fileobj=out, mode="w") as tar:
            for name, size in sorted(self.artifacts.files(prefix).items()):
                if name.startswith("."):
                    continue  # a file being replaced
                info = tarfile.TarInfo(name)
                with self.artifacts.open(f"{prefix}/{name}") as f:
                    # A running job's file grows as it is read: what it had when listed.
                    data = f.read(size)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        size = out.tell()
        out.seek(0)
        return out, size, f"{job.name}.{kind}.tar"


def chunks(f: IO[bytes], size: int, filename: str) -> Iterator[pb.DataChunk]:
    offset = 0
    while chunk := f.read(CHUNK):
        yield pb.DataChunk(data=chunk, offset=offset, total_size=size, filename=filename)
        offset += len(chunk)


def _cpu_only() -> dict[str, str]:
    # Only TensorFlow's errors in its stderr, so the reason is its last line.
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
