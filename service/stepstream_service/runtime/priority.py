"""CPU priority of the server's own threads, below the training on a machine both share."""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


def yield_cpu(nice: int) -> None:
    """Raise the calling thread's nice value, so that it yields the CPU to training. Linux
    keeps nice per thread: worker processes started from other threads keep theirs."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # some sandboxes refuse it: such a thread runs at full priority
        log.warning("could not lower a thread's CPU priority: %s", exc)
