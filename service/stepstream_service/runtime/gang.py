"""One rank of a job across workers (runtime.machines > 1), trained in a process of its own.

TensorFlow sets up its collectives once per process, before anything else runs, and a warm
worker has long started its runtime; a rank also blocks inside a collective while a peer is
gone, until its timeout. So each rank trains in a fresh child process (spawned, not forked:
the parent's TensorFlow threads do not survive a fork), which its worker can always kill. The
worker keeps the job's lease, its event writer and its checkpoints' upload as for any job;
the child sends it events through a pipe and is told through two flags when to stop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepstream.kernel.events import Event, ResultEvent
from stepstream_service.config import Settings
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.distribution import Cluster
from stepstream_service.errors import TrainerError

log = logging.getLogger(__name__)
# A collective that ends in one of these lost its peer: the attempt, not the job, failed.
PEER_LOST = ("UnavailableError", "DeadlineExceededError", "CancelledError", "AbortedError")


class ReplicaLost(TrainerError):
    """A rank of the job stopped answering, or its process ended without a result."""

    reason = "replica_lost"


class RankFailed(TrainerError):
    """The rank raised: its reason and message, as the trainer gave them."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Rank:
    """What a rank's process needs: the train() arguments that cross a process boundary."""

    spec: dict[str, Any]
    cluster: Cluster
    workdir: Path
    paths: DataPaths
    job_id: str
    resume: bool = False
    resume_upto: int | None = None
    final_checkpoint: bool = False
    start_from: Any = None  # a ForkSource, on the chief


def train_rank(
    settings: Settings,
    rank: Rank,
    emit: Callable[[Event], None],
    should_stop: Callable[[], bool],
    handing_back: Callable[[], bool],
    abandon: Callable[[], bool] = lambda: False,
) -> ResultEvent:
    """Train one rank in a child process; its events go to `emit`, its result is returned.
    `should_stop` and `handing_back` are asked about once per poll and passed on; when
    `abandon()` (the gang's attempt is over), the child is killed where it stands."""
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe(duplex=False)
    stop, hand = spawn.Event(), spawn.Event()
    child = spawn.Process(
        target=_rank_main,
        args=(settings, rank, theirs, stop, hand),
        name=f"rank-{rank.cluster.rank}-{rank.job_id}",
        daemon=True,
    )
    child.start()
    theirs.close()
    outcome: tuple | None = None
    try:
        while outcome is None:
            # Everything the child has sent, then the checks: should_stop also tells the
            # event writer a window is in, so it runs at least every poll, never starved.
            waiting = ours.poll(0.1)
            while waiting and outcome is None:
                try:
                    message = ours.recv()
                except EOFError:
                    break
                if message[0] == "event":
                    emit(message[1])
                else:
                    outcome = message
                waiting = ours.poll(0)
            if outcome is not None:
                break
            if abandon():
                log.info("job %s: rank %d abandoned", rank.job_id, rank.cluster.rank)
                break
            if should_stop():
                if handing_back():
                    hand.set()
                stop.set()
            if not child.is_alive() and not ours.poll(0):
                break
    finally:
        if outcome is None and child.is_alive():
            child.kill()
        child.join(timeout=30)
        ours.close()
    if outcome is None:
        raise ReplicaLost(
            "a replica of the job is gone"
            if abandon()
            else f"rank {rank.cluster.rank} of the job ended without a result "
            f"(its process exited with {child.exitcode})"
        )
    if outcome[0] == "result":
        return outcome[1]
    _, reason, message = outcome
    if reason == ReplicaLost.reason:
        raise ReplicaLost(message)
    raise RankFailed(reason, message)


def _rank_main(settings: Settings, rank: Rank, conn, stop, hand) -> None:
    """The child: one rank's train(), then its outcome down the pipe."""
    from stepstream_service.runtime.slots import die_with_parent
    from stepstream_service.runtime.worker import LOG_FORMAT

    # A worker killed outright takes its rank with it: its peers then see it gone.
    die_with_parent(os.getppid(), signal.SIGKILL)

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # TensorFlow's collectives log each all-reduce they set up at INFO.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    who = f"{rank.job_id}-rank{rank.cluster.rank}"
    outcome: tuple
    try:
        from stepstream_service.runtime.threads import configure_tensorflow

        configure_tensorflow(settings, who)
        from stepstream.kernel.spec import JobSpec
        from stepstream_service.engine.trainer import train

        result = train(
            JobSpec.parse(rank.spec),
            lambda event: conn.send(("event", event)),
            stop.is_set,
            workdir=rank.workdir,
            paths=rank.paths,
            resume=rank.resume,
            resume_upto=rank.resume_upto,
            job_id=rank.job_id,
            handing_back=hand.is_set,
            start_from=rank.start_from,
            final_checkpoint=rank.final_checkpoint,
            cluster=rank.cluster,
        )
        outcome = ("result", result)
    except Exception as exc:
        outcome = _failure(rank, exc)
    with contextlib.suppress(OSError):
        conn.send(outcome)
        conn.close()
    logging.shutdown()
    # TensorFlow's teardown of a collective whose peer is gone can block: nothing is left
    # to write, so the process ends here.
    os._exit(0)


def _failure(rank: Rank, exc: Exception) -> tuple[str, str, str]:
    name = type(exc).__name__
    if name in PEER_LOST:
        log.warning("job %s: rank %d lost a peer: %s", rank.job_id, rank.cluster.rank, exc)
        return (
            "error",
            ReplicaLost.reason,
            f"a replica of the job stopped answering ({name})",
        )
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        return ("error", reason, str(exc))
    log.exception("job %s: rank %d raised", rank.job_id, rank.cluster.rank)
    return (
        "error",
        "internal_error",
        f"the worker failed unexpectedly ({name}); the operator finds the details in the "
        f"worker's log under job {rank.job_id}",
    )


def watch_part(live: Callable[[], bool], every: float, until: threading.Event) -> threading.Event:
    """An event set once `live()` turns false (the gang's attempt is over), polled every
    `every` seconds until `until` is set."""
    over = threading.Event()

    def watch() -> None:
        while not until.wait(every):
            try:
                if not live():
                    over.set()
                    return
            except Exception:  # the store may be down for a moment
                log.warning("gang watch failed; trying again", exc_info=True)

    threading.Thread(target=watch, name="gang-watch", daemon=True).start()
    return over
