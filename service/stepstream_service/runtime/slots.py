"""A worker's hold on its device slot, and its tie to the supervisor that started it.

A worker holds an exclusive lock on its slot (a GPU, or one of N CPU workers) for its whole
life, so a supervisor started again after a crash cannot start a second worker for a device
that an orphan still uses: the new worker waits until the orphan is gone. And an orphan does
go: the kernel signals it when its supervisor dies (Linux), and a watchdog notices the new
parent in any case; it then stops claiming, hands its job back as on SIGTERM, and exits.

Light on imports: the supervisor uses `lock_path` without loading the training framework.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import threading
import time
from pathlib import Path

from stepstream_service.config import Settings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def lock_path(settings: Settings, slot: str) -> Path:
    """A GPU's lock is machine-wide (two data folders on one machine still share the device);
    a CPU slot's belongs to the data folder whose workers it counts."""
    if slot.startswith("gpu"):
        return settings.gpu_lock_dir / f"stepstream-{slot}.lock"
    return settings.data_dir.resolve() / "locks" / f"{slot}.lock"


class SlotLock:
    """An exclusive advisory lock (flock) held until this process ends: the kernel lets go of
    it however the process ends, kill -9 included, so a stale lock cannot outlive its holder."""

    def __init__(self, path: Path, who: str):
        self.path, self.who = path, who
        self.fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file in a shared folder: flock still works
            return os.open(self.path, os.O_RDONLY)

    def _holder(self) -> str:
        with contextlib.suppress(OSError):
            return self.path.read_text().strip() or "unknown"
        return "unknown"

    def acquire(self, stop: threading.Event, poll: float = 0.2) -> bool:
        """Take the lock, waiting while another process holds it; False if `stop` is set
        first (this worker was told to stop before it could start)."""
        fd = self._open()
        waited = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited is None:
                    waited = time.monotonic()
                    log.warning(
                        "worker %s: slot lock %s is held by pid %s (another worker on this device, "
                        "such as one whose supervisor died, still stopping); waiting for it",
                        self.who,
                        self.path,
                        self._holder(),
                    )
                if stop.wait(poll):
                    os.close(fd)
                    return False
        with contextlib.suppress(OSError):  # read-only: the holder goes unnamed
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        waiting = f" after waiting {time.monotonic() - waited:.1f} s" if waited else ""
        log.info("worker %s: slot lock %s taken%s", self.who, self.path, waiting)
        return True


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `sig` when the supervisor dies (Linux's PR_SET_PDEATHSIG). It fires
    when the supervisor's *thread* that started this process ends, which is why the supervisor
    starts workers from one long-lived thread. False if the supervisor is already gone."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the watchdog alone
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    # The supervisor may have died before the request was made; then nothing would come.
    return os.getppid() == parent_pid


class Watchdog(threading.Thread):
    """Sets `stop` once this process's parent is no longer `parent_pid` (it died, whatever
    killed it, and the process was handed to init or a subreaper); ends the process if the
    orderly stop takes longer than `grace` seconds. A job it still held then comes back
    through the lease rescuer, from its last checkpoint."""

    def __init__(
        self, parent_pid: int, stop: threading.Event, grace: float, who: str, every: float = 0.5
    ):
        super().__init__(name="supervisor-watchdog", daemon=True)
        self.parent_pid, self.stop, self.grace, self.who = parent_pid, stop, grace, who
        self.every = every

    def run(self) -> None:
        while os.getppid() == self.parent_pid:
            time.sleep(self.every)
        log.warning(
            "worker %s: its supervisor (pid %d) is gone; claiming no more jobs, handing a "
            "running one back to the queue and exiting",
            self.who,
            self.parent_pid,
        )
        self.stop.set()
        time.sleep(self.grace)
        log.error(
            "worker %s: still running %.0f s (grace_seconds) after its supervisor died; "
            "exiting now, its job's lease will lapse and the job is retried",
            self.who,
            self.grace,
        )
        logging.shutdown()
        os._exit(1)
