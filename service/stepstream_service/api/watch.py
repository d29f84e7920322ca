"""The WatchJob fan-out: runs of events without holes, the pace of a crowd, and messages built
once however many watchers send them."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

from stepstream.kernel.states import TERMINAL, JobState
from stepstream.kernel.wire import payload_to_proto
from stepstream.v1 import trainer_pb2 as pb
from stepstream_service.store import EventRow

# Seconds between one watcher's messages, per watcher of the job: a job's watchers together
# get about 50 messages a second however many they are. Each message costs the server a thread
# wakeup and a send, a few hundred microseconds, and the training pays for them on a busy CPU.
PACE_PER_WATCHER = 0.02
MAX_PACE = 1.0


def row_to_proto(row: EventRow) -> pb.JobEvent:
    return payload_to_proto(row.kind, row.payload, seq=row.seq, time=row.time)


def is_terminal(row: EventRow) -> bool:
    return row.kind == "state" and JobState(row.payload["state"]) in TERMINAL


def next_run(rows: list[EventRow], cursor: int) -> tuple[list[EventRow], bool]:
    """(the rows that follow `cursor` without a hole, whether a hole was found: the store
    then fills it). The run ends at a terminal event, always a job's last. Rows arrive in seq
    order, so a run without holes is told by its ends, not row by row: a crowd of watchers
    each does this several times a second, with hundreds of rows."""
    if not rows or rows[-1].seq <= cursor:
        return [], False
    start = cursor + 1 - rows[0].seq
    if start >= 0 and rows[-1].seq - rows[0].seq == len(rows) - 1:
        return rows[start:], False
    run: list[EventRow] = []
    for row in rows:
        if row.seq <= cursor:
            continue
        if row.seq != cursor + 1:  # never expected; the store fills any hole
            return run, True
        run.append(row)
        cursor = row.seq
        if is_terminal(row):
            break
    return run, False


def until_tick(now: float, pace: float) -> float:
    """Seconds from `now` to the next multiple of `pace`; never negative, whatever the
    rounding of the division."""
    return max(math.ceil(now / pace) * pace - now, 0.0)


class ProtoCache:
    """Watchers in step receive the same runs of events: each run becomes one response
    message, built and serialized once however many watchers send it (as bytes, which
    DecodeGuard lets through). Runs that differ (a watcher that has just caught up from the
    store) share the events themselves, each converted once."""

    def __init__(self, size: int = 2_000, events: int = 50_000):
        self.size, self.events_size = size, events
        self.items: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self.events: OrderedDict[int, pb.JobEvent] = OrderedDict()
        self.lock = threading.Lock()

    def response(self, rows: list[EventRow]) -> bytes:
        key = (rows[0].id, rows[-1].id)  # ids are global and consecutive within a job's run
        # Built under the lock: a tick's watchers wake together, and outside it they would all
        # miss and build the same message at once. The GIL runs the builds one at a time anyway.
        with self.lock:
            found = self.items.get(key)
            if found is None:
                batch = pb.EventBatch(events=[self._event(r) for r in rows])
                message = pb.WatchJobResponse(batch=batch).SerializeToString()
                found = self.items[key] = message
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
                while len(self.events) > self.events_size:
                    self.events.popitem(last=False)
            return found

    def _event(self, row: EventRow) -> pb.JobEvent:
        found = self.events.get(row.id)
        if found is None:
            found = self.events[row.id] = row_to_proto(row)
        return found
