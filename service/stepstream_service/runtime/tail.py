"""The event tail: one reader of the store's new events, feeding every watcher and the gauges.

Many watchers of one job cost one read of the store. Each watcher has a bounded buffer; one that
falls behind is told to catch up from the store itself, so a slow watcher never holds memory or
slows anyone else, and sequence numbers keep its stream free of gaps and duplicates.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import defaultdict, deque

from stepstream.kernel.events import StateEvent, from_payload
from stepstream.kernel.states import TERMINAL, JobState
from stepstream_service.runtime.metrics import Metrics
from stepstream_service.runtime.priority import yield_cpu
from stepstream_service.store import EVENTS_CHANNEL, EventRow, Store
from stepstream_service.store.wakeups import Wakeups

log = logging.getLogger(__name__)


# Every step is an event, and a watcher of a crowd takes its buffer once a second (a tick of
# MAX_PACE, or two when a cut holds rows back): the limit must hold that for a fast job, or
# every crowd watcher falls back to reading the store. The rows themselves are shared by all
# of a job's buffers; each buffer holds references.
BUFFER_LIMIT = 20_000
# A watched job's latest rows, kept so that a watcher attaching near the head (a crowd
# arriving, a client resuming after a dropped connection) starts from memory, not the store:
# a store read decodes every row again, and was most of an attach's cost.
RECENT_LIMIT = 5_000


class Subscription:
    def __init__(self, job_id: str, seed: list[EventRow] | None = None):
        self.job_id = job_id
        # Seeded: the buffer starts with every event after the watcher's seq, and the store
        # need not be read.
        self.seeded = seed is not None
        self.buffer: deque[EventRow] = deque(seed or ())
        self.overflowed = False
        self.ready = threading.Condition()

    def push(self, rows: list[EventRow]) -> None:
        with self.ready:
            if len(self.buffer) + len(rows) > BUFFER_LIMIT:
                self.buffer.clear()
                self.overflowed = True
            else:
                self.buffer.extend(rows)
            self.ready.notify_all()

    def wake(self) -> None:
        with self.ready:
            self.ready.notify_all()

    def take(self, timeout: float, upto: int | None = None) -> tuple[list[EventRow], bool]:
        """(buffered rows, whether the watcher must re-read from the store). With `upto`, a
        buffer that reaches past that event id gives only the rows up to it and keeps the rest
        for next time."""
        with self.ready:
            if not self.buffer and not self.overflowed:
                self.ready.wait(timeout)
            if self.overflowed:
                self.overflowed = False
                return [], True
            if upto is not None and self.buffer and self.buffer[0].id <= upto < self.buffer[-1].id:
                rows = []
                while self.buffer[0].id <= upto:
                    rows.append(self.buffer.popleft())
                return rows, False
            rows = list(self.buffer)
            self.buffer.clear()
            return rows, False


class EventTail:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        poll_seconds: float,
        linger_seconds: float = 300.0,
        wakeups: Wakeups | None = None,
        *,
        nice: int = 0,
    ):
        self.store, self.metrics = store, metrics
        self.poll_seconds, self.linger_seconds = poll_seconds, linger_seconds
        self.wakeups, self.nice = wakeups, nice
        self.cursor = store.last_event_id()
        self.subs: dict[str, set[Subscription]] = defaultdict(set)
        self.recent: dict[str, deque[EventRow]] = {}  # per watched job, its latest rows
        self.cuts: dict[str, tuple[object, int]] = {}
        self.lock = threading.Lock()
        self.names: dict[str, str] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="event-tail", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def subscribe(self, job_id: str, after_seq: int | None = None) -> Subscription:
        """A buffer of the job's events from now on; with `after_seq`, seeded with the events
        after it when the job's recent rows reach back that far (see `Subscription.seeded`)."""
        with self.lock:
            recent = self.recent.get(job_id)
            seed = None
            if after_seq is not None and recent and recent[0].seq <= after_seq + 1:
                # A job's seqs are consecutive, so the position follows from the first one.
                seed = list(itertools.islice(recent, after_seq + 1 - recent[0].seq, None))
            sub = Subscription(job_id, seed)
            self.subs[job_id].add(sub)
        return sub

    def watchers(self, job_id: str) -> int:
        with self.lock:
            return len(self.subs.get(job_id, ()))

    def cut(self, job_id: str, tick: object) -> int:
        """The last event id of the job that every watcher sends at `tick`: the newest id the
        tail had when the first of them woke for it. Watchers that end their messages at the
        same cut send the same runs of events, so each message is built once; a watcher that
        has drifted (a later start, or a push between two wakings) is back in step after one
        tick."""
        with self.lock:
            found = self.cuts.get(job_id)
            if found is None or found[0] != tick:
                recent = self.recent.get(job_id)
                found = self.cuts[job_id] = (tick, recent[-1].id if recent else 0)
            return found[1]

    def unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            self.subs[sub.job_id].discard(sub)
            if not self.subs[sub.job_id]:
                del self.subs[sub.job_id]
                self.cuts.pop(sub.job_id, None)
                self.recent.pop(sub.job_id, None)

    def _run(self) -> None:
        yield_cpu(self.nice)
        while not self.stopping.is_set():
            try:
                moved = self.poll_once()
            except Exception:  # the store may be briefly unavailable; keep tailing
                log.exception("event tail: reading the store failed")
                moved = False
            if not moved and self.wakeups is not None and self.wakeups.listening:
                self.wakeups.wait(EVENTS_CHANNEL, self.poll_seconds)
            elif not moved:
                self.stopping.wait(self.poll_seconds)

    def poll_once(self) -> bool:
        rows = self.store.events_since(self.cursor)
        if not rows:
            self.metrics.forget_ended(self.linger_seconds)
            return False
        self.cursor = rows[-1].id
        by_job: dict[str, list[EventRow]] = defaultdict(list)
        for row in rows:
            by_job[row.job_id].append(row)
        for job_id, job_rows in by_job.items():
            self._observe(job_id, job_rows)
            with self.lock:
                subs = list(self.subs.get(job_id, ()))
                if subs:
                    # With the subscribers taken in the same lock: a watcher that subscribes
                    # after it finds these rows in its seed, and is not pushed them again.
                    recent = self.recent.setdefault(job_id, deque(maxlen=RECENT_LIMIT))
                    recent.extend(job_rows)
            for sub in subs:
                sub.push(job_rows)
        return True

    def _observe(self, job_id: str, rows: list[EventRow]) -> None:
        steps = [r for r in rows if r.kind == "step"]
        if steps:
            name = self._name(job_id)
            last = steps[-1].payload
            self.metrics.job_progress(
                job_id,
                name,
                last["step"],
                last["loss"],
                last.get("accuracy"),
                last.get("mae"),
                last["steps_per_second"],
            )
            if last["steps_per_second"] > 0:  # one sample per poll: a window's step time
                self.metrics.step_time.observe(1.0 / last["steps_per_second"])
        for r in rows:
            if r.kind != "state":
                continue
            change = from_payload(r.kind, r.payload)
            assert isinstance(change, StateEvent)
            state = change.state
            if state == JobState.QUEUED and change.attempt > 0:
                self.metrics.retries.inc()
            if state in TERMINAL:
                self.metrics.completions.labels(state.value).inc()
                if state == JobState.FAILED and change.failure:
                    self.metrics.failures.labels(change.failure.reason).inc()
                self._timings(job_id)
                self.metrics.job_ended(job_id, self._name(job_id))
                self.names.pop(job_id, None)  # a long-lived server sees many jobs
            elif state == JobState.RUNNING:
                job = self.store.get_job(job_id)
                if job.started_at:
                    self.metrics.queue_wait.observe(max(job.started_at - job.queued_at, 0.0))

    def _timings(self, job_id: str) -> None:
        job = self.store.get_job(job_id)
        if job.started_at and job.finished_at:
            self.metrics.job_duration.observe(job.finished_at - job.started_at)

    def _name(self, job_id: str) -> str:
        if job_id not in self.names:
            self.names[job_id] = self.store.get_job(job_id).name
        return self.names[job_id]
