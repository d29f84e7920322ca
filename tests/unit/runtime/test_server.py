"""Worker slots: one pinned process per GPU, or N CPU workers with every GPU hidden."""

from __future__ import annotations

from pathlib import Path

from stepstream_service.config import Settings
from stepstream_service.runtime.server import Supervisor, gpu_ids


def test_gpu_lists():
    assert gpu_ids("none") == []
    assert gpu_ids("0,2") == ["0", "2"]
    assert gpu_ids(" 1 , ") == ["1"]


def test_one_worker_per_listed_gpu_each_pinned(tmp_path: Path):
    sup = Supervisor(Settings(gpus="0,1", workers=5, data_dir=tmp_path))
    assert sup.slots == [("gpu0", "0"), ("gpu1", "1")]
    envs = [sup._env(devices) for _, devices in sup.slots]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1"]


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
