"""Wake-ups when a job is queued or events are written, so nobody waits out a poll interval.

On PostgreSQL one listening connection per process receives NOTIFY messages (job ids only; the
data is read from the tables). SQLite has no such thing, and there the waits simply time out
at the poll interval. A lost listening connection wakes everyone once it is back, since
notifications sent meanwhile are gone.
"""

from __future__ import annotations

import logging
import threading
import time

import sqlalchemy as sa

from stepstream_service.store.database import POSTGRES_CONNECT

log = logging.getLogger(__name__)
UNTIL_CHECK_SECONDS = 0.25  # how soon a wait notices its `until` event


class Wakeups:
    def __init__(self, url: str, channels: tuple[str, ...]):
        parsed = sa.make_url(url)
        self.listening = parsed.get_backend_name() == "postgresql"
        self.channels = channels
        self.flags = {c: threading.Event() for c in channels}
        self.stopping = threading.Event()
        self.conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self.connected = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> Wakeups:
        if self.listening:
            self.thread = threading.Thread(target=self._listen, name="listen", daemon=True)
            self.thread.start()
            self.connected.wait(5)
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=3)

    def wait(self, channel: str, timeout: float, until: threading.Event | None = None) -> bool:
        """True when woken by a notification; False when the timeout passed or `until` was
        set (a worker told to stop must not sleep out a long poll interval first)."""
        flag = self.flags[channel]
        end = time.monotonic() + timeout
        woken = False
        while not woken and (until is None or not until.is_set()):
            left = end - time.monotonic()
            if left <= 0:
                break
            woken = flag.wait(left if until is None else min(left, UNTIL_CHECK_SECONDS))
        flag.clear()
        return woken

    def _wake_all(self) -> None:
        for flag in self.flags.values():
            flag.set()

    def _listen(self) -> None:
        import psycopg

        while not self.stopping.is_set():
            try:
                with psycopg.connect(
                    self.conninfo, autocommit=True, connect_timeout=5, **POSTGRES_CONNECT
                ) as conn:
                    for channel in self.channels:
                        conn.execute(f"LISTEN {channel}")
                    self.connected.set()
                    self._wake_all()
                    while not self.stopping.is_set():
                        for note in conn.notifies(timeout=0.5):
                            flag = self.flags.get(note.channel)
                            if flag is not None:
                                flag.set()
            except Exception as exc:  # the database restarts or is briefly unreachable
                log.warning("listening for notifications failed (%s); retrying", exc)
                self._wake_all()
                self.stopping.wait(1.0)
