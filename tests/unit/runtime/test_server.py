"""Worker slots: one pinned process per GPU, or N CPU workers with every GPU hidden."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepstream_service.config import Settings
from stepstream_service.runtime.server import (
    InsecureListen,
    NoGPUs,
    Server,
    Supervisor,
    gpu_ids,
)


def test_gpu_lists():
    assert gpu_ids("none") == []
    assert gpu_ids("0,2") == ["0", "2"]
    assert gpu_ids(" 1 , ") == ["1"]


def test_one_worker_per_listed_gpu_each_pinned(tmp_path: Path):
    sup = Supervisor(Settings(gpus="0,1", workers=5, data_dir=tmp_path))
    assert sup.slots == [("gpu0", "0"), ("gpu1", "1")]
    envs = [sup._env(devices) for _, devices in sup.slots]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1"]


def test_workers_of_several_gpus_for_jobs_on_several_devices(tmp_path: Path, caplog):
    sup = Supervisor(Settings(gpus="0,1,2,3,4", gpus_per_worker=2, data_dir=tmp_path))
    assert sup.slots == [("gpu0+1", "0,1"), ("gpu2+3", "2,3")]
    assert "leaves 4 without a worker" in caplog.text


def test_cpu_workers_split_into_logical_devices_when_asked(tmp_path: Path):
    sup = Supervisor(Settings(workers=2, cpu_devices=2, data_dir=tmp_path))
    assert sup._env("")["TRAINER_CPU_DEVICES"] == "2"


def test_cpu_workers_see_no_gpu_and_share_the_store(tmp_path: Path):
    settings = Settings(gpus="none", workers=3, data_dir=tmp_path, lease_seconds=7)
    sup = Supervisor(settings)
    assert [slot for slot, _ in sup.slots] == ["cpu0", "cpu1", "cpu2"]
    env = sup._env("")
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["TRAINER_STORE"] == settings.store_url
    assert env["TRAINER_LEASE_SECONDS"] == "7.0"
    assert env["TRAINER_DATA_DIR"] == str(tmp_path.resolve())


def test_the_server_process_does_not_load_the_training_framework():
    """The API server stays small (its RSS is watched in bench/load.py); only workers pay for
    TensorFlow."""
    import subprocess
    import sys

    code = (
        "import sys, stepstream_service.runtime.server, stepstream.cli;"
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_each_worker_is_tied_to_its_supervisor_and_its_slot(tmp_path: Path, monkeypatch):
    import os
    import subprocess
    import threading

    started: list[tuple[list[str], str]] = []

    class FakeProcess:
        pid = 1234

        def __init__(self, cmd, env):
            started.append((cmd, threading.current_thread().name))

        def poll(self):
            return None

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    sup = Supervisor(Settings(gpus="none", workers=1, data_dir=tmp_path, grace_seconds=7))
    sup.start()
    sup.stopping.set()
    ((cmd, thread),) = started
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags["--parent-pid"] == str(os.getpid())
    assert flags["--slot-lock"] == str(tmp_path.resolve() / "locks" / "cpu0.lock")
    # Linux signals the worker when the thread that started it ends: a long-lived one.
    assert thread == "supervisor"
    assert sup._env("")["TRAINER_GRACE_SECONDS"] == "7.0"


# ---------------------------------------------------------------- --gpus all, auto


def without_nvidia_smi(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))


def test_gpus_all_without_nvidia_smi_is_an_error(monkeypatch, tmp_path: Path):
    without_nvidia_smi(monkeypatch, tmp_path)
    with pytest.raises(NoGPUs, match=r"^--gpus all: nvidia-smi is not on PATH") as caught:
        gpu_ids("all")
    assert "NVIDIA Container Toolkit" in str(caught.value)
    assert "--gpus none for CPU workers, or --gpus auto" in str(caught.value)
    with pytest.raises(NoGPUs):
        Supervisor(Settings(gpus="all", workers=2, data_dir=tmp_path))


def test_gpus_all_when_nvidia_smi_lists_none_is_an_error(monkeypatch, tmp_path: Path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(NoGPUs, match=r"nvidia-smi lists no GPU \(it says: No devices were found"):
        gpu_ids("all")


def test_gpus_auto_without_a_gpu_is_cpu_workers_with_a_warning(monkeypatch, tmp_path, caplog):
    without_nvidia_smi(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, "stepstream_service.runtime.server"):
        assert gpu_ids("auto") == []
    assert "--gpus auto: no GPU was found: nvidia-smi is not on PATH" in caplog.text
    sup = Supervisor(Settings(gpus="auto", workers=2, data_dir=tmp_path))
    assert [slot for slot, _ in sup.slots] == ["cpu0", "cpu1"]


def test_gpus_all_and_auto_use_every_gpu_nvidia_smi_lists(monkeypatch, tmp_path: Path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: A (UUID: x)'\necho 'GPU 1: B (UUID: y)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert gpu_ids("all") == gpu_ids("auto") == ["0", "1"]


def trainer(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, **env)
    return subprocess.run(
        [sys.executable, "-m", "stepstream.cli", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_trainer_with_gpus_all_and_no_gpu_exits_2_and_starts_nothing(tmp_path, command):
    # This process's own interpreter, on a PATH without nvidia-smi.
    data = tmp_path / "data"
    done = trainer(
        command,
        "--gpus",
        "all",
        "--data-dir",
        str(data),
        "--store",
        f"sqlite:///{tmp_path / 'trainer.db'}",
        *(["--port", "0", "--metrics-port", "0"] if command == "serve" else []),
        PATH=str(tmp_path / "empty"),
    )
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        f"trainer {command}: --gpus all: nvidia-smi is not on PATH, so no GPU can be used here "
        "(in a container: docker run --gpus all needs the NVIDIA Container Toolkit); use "
        "--gpus none for CPU workers, or --gpus auto"
    ), done.stderr
    assert not data.exists() and not (tmp_path / "trainer.db").exists()


# ---------------------------------------------------------------- listening, and the serve file


def test_no_authentication_on_a_wildcard_host_is_refused_before_anything_is_made(tmp_path):
    settings = Settings(host="0.0.0.0", workers=0, data_dir=tmp_path / "data")
    with pytest.raises(InsecureListen, match=r"^refusing to listen on 0\.0\.0\.0 with no auth"):
        Server(settings)
    assert not settings.data_dir.exists()


def test_insecure_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRAINER_INSECURE", "1")
    assert Settings().insecure is True


def test_the_serve_file_is_written_whole_and_removed_on_stop(tmp_path: Path):
    served = tmp_path / "run" / "serve.json"
    server = Server(
        Settings(port=0, metrics_port=0, workers=0, data_dir=tmp_path / "data", serve_file=served)
    )
    server.start()
    try:
        assert json.loads(served.read_text()) == {
            "pid": os.getpid(),
            "host": "127.0.0.1",
            "port": server.port,
            "tls": False,
            "metrics_host": "127.0.0.1",
            "metrics_port": server.metrics_port,
        }
        assert served.stat().st_mode & 0o777 == 0o644
        assert [p.name for p in served.parent.iterdir()] == ["serve.json"]
    finally:
        server.stop(grace=0)
    assert not served.exists()


def test_a_stopping_server_leaves_another_servers_serve_file(tmp_path: Path):
    served = tmp_path / "serve.json"
    server = Server(
        Settings(port=0, metrics_port=0, workers=0, data_dir=tmp_path / "data", serve_file=served)
    )
    server.start()
    served.write_text(json.dumps({"pid": os.getpid() + 1, "host": "0.0.0.0", "port": 1}))
    server.stop(grace=0)
    assert served.exists()
