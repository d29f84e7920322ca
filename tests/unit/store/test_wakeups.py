from __future__ import annotations

import threading
import time

from stepstream_service.store.wakeups import Wakeups


def test_a_wait_ends_when_its_until_event_is_set_not_at_its_timeout(tmp_path):
    """A SIGTERMed worker idles in this wait: with a long poll interval it used to sleep it
    out, past its server's grace period, and was killed instead of stopping cleanly."""
    wakeups = Wakeups(f"sqlite:///{tmp_path / 'x.db'}", ("queue",))
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    done = threading.Event()
    result: list[bool] = []
    waiter = threading.Thread(
        target=lambda: (result.append(wakeups.wait("queue", 600, until=stop)), done.set())
    )
    waiter.start()
    assert done.wait(60), "the wait ignored its until event"
    assert result == [False] and time.monotonic() - started < 60


def test_a_wait_still_times_out_and_is_woken():
    wakeups = Wakeups("sqlite://", ("queue",))
    assert wakeups.wait("queue", 0.05) is False
    assert wakeups.wait("queue", 0.05, until=threading.Event()) is False
    wakeups.flags["queue"].set()
    assert wakeups.wait("queue", 600, until=threading.Event()) is True
    assert not wakeups.flags["queue"].is_set()  # consumed
