"""TensorFlow's thread pools: sized from TRAINER_CPU_THREADS, else from the CPUs this process may
use (affinity and cgroup CPU quota), and set before the framework's runtime starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from stepstream_service.config import Settings
from stepstream_service.runtime import threads


def test_cpu_threads_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv("TRAINER_CPU_THREADS", "3")
    assert threads.thread_count(Settings()) == (3, "TRAINER_CPU_THREADS")


@pytest.mark.parametrize("value", ["0", "-2"])
def test_cpu_threads_below_one_is_refused(monkeypatch, value):
    monkeypatch.setenv("TRAINER_CPU_THREADS", value)
    with pytest.raises(ValidationError, match="cpu_threads"):
        Settings()


def test_without_a_quota_the_count_is_the_affinity(monkeypatch):
    monkeypatch.delenv("LOKY_MAX_CPU_COUNT", raising=False)
    quota = threads.cpu_quota()
    cores = len(os.sched_getaffinity(0))
    if quota is not None and quota < cores:
        pytest.skip(f"this machine has a CPU quota of {quota} cores")
    assert threads.available_cpus() == cores
    assert threads.thread_count(Settings()) == (cores, f"{cores} cores")


def cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "cores"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2", "v2-unlimited", "v1", "v1-unlimited", "none"],
)
def test_the_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, cores):
    assert threads.cpu_quota(cgroup(tmp_path, files)) == cores


def test_the_log_says_where_the_count_came_from(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    root = cgroup(tmp_path, {"cpu.max": "150000 100000\n"})
    assert threads.thread_count(Settings(), root) == (2, "CPU quota 1.5 of 8 cores")


WORKER_LIKE = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
# What a worker has imported by the time it sizes the pools.
import stepstream_service.runtime.worker
from stepstream_service.config import Settings
from stepstream_service.runtime.threads import configure_tensorflow

if sys.argv[1] == "affinity":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
configure_tensorflow(Settings(), "w1")
from stepstream_service.engine.trainer import devices

devices()
import tensorflow as tf

float(tf.reduce_sum(tf.ones((64, 64)) @ tf.ones((64, 64))))  # the runtime is up now
print(
    tf.config.threading.get_intra_op_parallelism_threads(),
    tf.config.threading.get_inter_op_parallelism_threads(),
)
"""


def worker_like(how: str, **env: str) -> tuple[list[int], str]:
    environ = {k: v for k, v in os.environ.items() if k != "TRAINER_CPU_THREADS"}
    environ.update(env, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", WORKER_LIKE, how],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [int(n) for n in done.stdout.split()], done.stderr


def test_a_worker_with_cpu_threads_1_runs_tensorflow_on_one_thread_each():
    sizes, log = worker_like("settings", TRAINER_CPU_THREADS="1")
    assert sizes == [1, 1]
    assert (
        "INFO stepstream_service.runtime.threads: worker w1: TensorFlow thread pools: "
        "1 intra-op, 1 inter-op (TRAINER_CPU_THREADS)"
    ) in log, log[-3000:]
    assert "left as they are" not in log


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to narrow")
def test_a_worker_pinned_to_one_core_sizes_its_pools_to_it():
    sizes, log = worker_like("affinity")
    assert sizes == [1, 1]
    assert "TensorFlow thread pools: 1 intra-op, 1 inter-op (1 core)" in log, log[-3000:]
