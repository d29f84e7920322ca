from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

CHILD = textwrap.dedent(
    """
    import signal, sys, threading
    {make}
    print("ready", flush=True)
    while not stop.wait(0.0005):  # the main thread in and out of the event's lock
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("stopped", flush=True)
    sys.stdin.read()
    """
)
LOCK_FREE = "from stepstream_service.runtime.signals import stop_event\nstop = stop_event()"


@pytest.mark.parametrize("seconds", [0, 2])
def test_stop_signals_stop_the_process_and_never_deadlock_it(seconds):
    """The worker used to set its stop event in the signal handler itself: a SIGTERM arriving
    while the main thread held the event's lock (or during an earlier handler) hung it until
    its supervisor killed it. One signal, then a stream of them."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(make=LOCK_FREE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        said: list[str] = []
        reader = threading.Thread(target=lambda: said.append(child.stdout.readline().strip()))
        reader.start()
        os.kill(child.pid, signal.SIGTERM)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.kill(child.pid, signal.SIGTERM)
        reader.join(timeout=60)
        assert said == ["stopped"], "the process hung on its stop signal"
        child.stdin.close()
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
