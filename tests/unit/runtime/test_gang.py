"""runtime.gang without TensorFlow: how a rank's failure is told to its worker, and the watch
that ends a rank once its gang's attempt is over. Ranks training for real across two worker
processes are in tests/integration/test_gangs.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.distribution import Cluster
from stepstream_service.errors import DatasetInvalid
from stepstream_service.runtime.gang import Rank, ReplicaLost, _failure, watch_part

RANK = Rank(
    spec={},
    cluster=Cluster(("a:1", "b:2"), 1),
    workdir=Path("/nowhere"),
    paths=DataPaths(),
    job_id="job-x",
)


def raised(name: str) -> Exception:
    return type(name, (Exception,), {})("peer gone")


def test_a_peer_lost_in_a_collective_is_a_lost_replica():
    for name in ("UnavailableError", "DeadlineExceededError", "CancelledError", "AbortedError"):
        kind, reason, message = _failure(RANK, raised(name))
        assert (kind, reason) == ("error", ReplicaLost.reason)
        assert message == f"a replica of the job stopped answering ({name})"


def test_a_trainer_error_keeps_its_reason_and_anything_else_is_a_bug():
    assert _failure(RANK, DatasetInvalid("bad labels")) == (
        "error",
        "dataset_invalid",
        "bad labels",
    )
    kind, reason, message = _failure(RANK, raised("ValueError"))
    assert (kind, reason) == ("error", "internal_error")
    assert "job-x" in message and "peer gone" not in message  # details stay in the log


def test_the_watch_fires_once_the_attempt_is_over_and_stops_when_told():
    alive = [True]
    until = threading.Event()
    over = watch_part(lambda: alive[0], 0.01, until)
    time.sleep(0.05)
    assert not over.is_set()
    alive[0] = False
    assert over.wait(2)

    quiet = threading.Event()
    calls = []
    watch_part(lambda: calls.append(1) or True, 0.01, quiet)
    quiet.set()
    time.sleep(0.05)
    seen = len(calls)
    time.sleep(0.05)
    assert len(calls) == seen  # stopped


def test_a_store_that_fails_for_a_moment_does_not_end_the_part():
    answers = iter([RuntimeError("store down"), True, False])

    def live():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    over = watch_part(live, 0.01, threading.Event())
    assert over.wait(2)
    assert list(answers) == []  # it went on past the failure and the True: the False ended it
