"""SIGTERM and SIGINT as a threading.Event, set without taking a lock in a signal handler.

Python runs a signal handler in the main thread between two bytecodes, possibly while that
thread holds the very lock `Event.set()` needs (inside `Event.wait()`, or inside an earlier
handler's `set()` when two signals arrive together): the process then deadlocks, and its
supervisor has to kill it. Here the handler only writes a byte to a pipe; a thread of its own
reads it and sets the event.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_event(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> threading.Event:
    """An event set once any of `signals` arrives; call from the main thread."""
    stop = threading.Event()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def relay() -> None:
        os.read(read_fd, 1)
        stop.set()

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already says "stop"
            os.write(write_fd, b"!")

    threading.Thread(target=relay, name="signals", daemon=True).start()
    for sig in signals:
        signal.signal(sig, handler)
    return stop
