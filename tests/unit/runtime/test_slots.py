"""A worker's slot lock and its tie to its supervisor."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from stepstream_service.config import Settings
from stepstream_service.runtime.slots import SlotLock, lock_path
from tests.conftest import alive


def test_gpu_locks_are_machine_wide_and_cpu_locks_per_data_folder(tmp_path: Path):
    a = Settings(data_dir=tmp_path / "a", gpu_lock_dir=tmp_path / "run")
    b = Settings(data_dir=tmp_path / "b", gpu_lock_dir=tmp_path / "run")
    assert lock_path(a, "gpu1") == lock_path(b, "gpu1") == tmp_path / "run/stepstream-gpu1.lock"
    assert lock_path(a, "cpu0") != lock_path(b, "cpu0")
    assert lock_path(a, "cpu0") == (tmp_path / "a").resolve() / "locks" / "cpu0.lock"


def test_a_held_slot_is_waited_for_and_named(tmp_path: Path, caplog):
    path = tmp_path / "locks" / "cpu0.lock"
    first = SlotLock(path, "w1")
    assert first.acquire(threading.Event())
    assert path.read_text() == f"{os.getpid()}\n"
    second = SlotLock(path, "w2")
    got = threading.Event()
    with caplog.at_level(logging.INFO, logger="stepstream_service.runtime.slots"):
        waiter = threading.Thread(target=lambda: second.acquire(threading.Event()) and got.set())
        waiter.start()
        time.sleep(0.5)
        assert not got.is_set(), "two holders of one slot"
        assert f"held by pid {os.getpid()}" in caplog.text
        os.close(first.fd)  # the holder ends: the kernel lets go of its lock
        waiter.join(timeout=5)
    assert got.is_set()
    assert "taken after waiting" in caplog.text


def test_a_worker_told_to_stop_while_waiting_gives_up(tmp_path: Path):
    path = tmp_path / "cpu0.lock"
    assert SlotLock(path, "w1").acquire(threading.Event())
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert not SlotLock(path, "w2").acquire(stop)


@pytest.mark.parametrize("signalled", [True, False], ids=["kernel-signal", "watchdog-only"])
def test_a_worker_whose_supervisor_dies_stops_and_exits(tmp_path: Path, signalled: bool):
    """The supervisor is killed with kill -9: the kernel's signal, or else the watchdog, stops
    the worker, which exits on its own."""
    child = textwrap.dedent(
        """
        import os, signal, sys, threading, time
        from stepstream_service.runtime.slots import Watchdog, die_with_parent
        parent = int(sys.argv[1])
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        if sys.argv[2] == "True":
            assert die_with_parent(parent)
        Watchdog(parent, stop, grace=30, who="w", every=0.1).start()
        print("ready", file=sys.stderr, flush=True)
        stop.wait(60)
        print("stopped", file=sys.stderr, flush=True)
        """
    )
    supervisor = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {child!r}, str(os.getpid()), "{signalled}"])
        print(p.pid, flush=True)
        time.sleep(60)
        """
    )
    out = tmp_path / "out"
    with out.open("w") as sink:
        sup = subprocess.Popen(
            [sys.executable, "-c", supervisor], stdout=subprocess.PIPE, stderr=sink, text=True
        )
        worker = int(sup.stdout.readline())
        deadline = time.monotonic() + 60
        while "ready" not in out.read_text():
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        sup.kill()
        sup.wait()
        deadline = time.monotonic() + 10
        while alive(worker):
            assert time.monotonic() < deadline, "the worker outlived its supervisor by 10 s"
            time.sleep(0.05)
    assert "stopped" in out.read_text(), out.read_text()  # by its own hand, not killed
