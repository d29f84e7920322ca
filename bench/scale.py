"""PostgreSQL against SQLite, side by side in one run on this machine.

submit->RUNNING  tiny jobs submitted one at a time to an idle warm worker: the client's send
                 time to the RUNNING event's time. On PostgreSQL the worker is woken by NOTIFY.
step->client     every step of a 3000-step job: when a watcher received it minus when the
                 step finished on the worker. On PostgreSQL the event tail is woken by NOTIFY.
claims/s         8 worker processes claim and finish pre-queued jobs as fast as they can, with
                 no training in between: the queue's own throughput. Each job must be claimed
                 exactly once.

  python bench/scale.py [--latency-jobs 40] [--claim-jobs 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

from service import percentile, start_server, submit_latency, watch
from stepstream.client import TrainingClient

ADMIN = os.environ.get("TRAINER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
STREAMED = {
    "name": "streamed",
    "dataset": {"name": "synthetic_classification", "num_samples": 512, "num_features": 8},
    "model": {"architecture": "mlp", "hidden_units": [16]},
    "training": {"steps": 3000, "batch_size": 32},
}


class Database:
    """A throw-away database of either engine."""

    def __init__(self, engine: str, folder: Path):
        self.engine = engine
        if engine == "sqlite":
            self.url = f"sqlite:///{folder / f'{uuid.uuid4().hex[:8]}.db'}"
            return
        import psycopg

        self.name = f"trainer_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{self.name}"')
        self.url = ADMIN.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        if self.engine == "postgresql":
            import psycopg

            with psycopg.connect(ADMIN, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def latencies(engine: str, folder: Path, jobs: int) -> tuple[list[float], list[float]]:
    db = Database(engine, folder)
    proc, address = start_server(folder / f"data-{engine}", db.url)
    try:
        with TrainingClient(address) as client:
            client.submit(STREAMED | {"training": {"steps": 10}}).wait(timeout=120)  # warm
            submit = submit_latency(client, jobs)
            job = client.submit(STREAMED)
            events: list = []
            steps: list[float] = []
            watch(client, job.name, events, steps)
            assert job.info().state == "SUCCEEDED" and len(steps) == 3000
            return submit, steps
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        db.drop()


def _claimer(url: str, name: str, start, out) -> None:
    from stepstream_service.store import JobState, Store

    store = Store(url)
    start.wait()
    claimed = []
    while (job := store.claim(name, 30)) is not None:
        store.finish(job.id, name, JobState.SUCCEEDED)
        claimed.append(job.id)
    out.put(claimed)
    store.close()


def claim_rate(engine: str, folder: Path, jobs: int, workers: int = 8) -> float:
    from stepstream_service.store import JobState, NewJob, Store

    db = Database(engine, folder)
    try:
        store = Store(db.url)
        for i in range(jobs):
            store.create_job(NewJob(name=f"c{i}"))
        ctx = multiprocessing.get_context("spawn")
        start, out = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_claimer, args=(db.url, f"w{i}", start, out)) for i in range(workers)
        ]
        for p in procs:
            p.start()
        time.sleep(2.0)  # every claimer has connected
        began = time.perf_counter()
        start.set()
        claimed = [job for _ in procs for job in out.get()]
        took = time.perf_counter() - began
        for p in procs:
            p.join()
        assert len(claimed) == jobs == len(set(claimed)), "a job was claimed twice or lost"
        assert store.queue_depth()[JobState.SUCCEEDED.value] == jobs
        store.close()
        return jobs / took
    finally:
        db.drop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=40)
    parser.add_argument("--claim-jobs", type=int, default=2000)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("sqlite", "postgresql"):
            submit, steps = latencies(engine, Path(tmp), args.latency_jobs)
            rate = claim_rate(engine, Path(tmp), args.claim_jobs)
            results[engine] = (submit, steps, rate)
            print(
                f"{engine}: submit->RUNNING p50 {percentile(submit, 0.5) * 1000:.1f} ms, "
                f"step->client p99 {percentile(steps, 0.99) * 1000:.1f} ms, "
                f"{rate:.0f} claims/s",
                flush=True,
            )
    print(f"\n{'':28}{'SQLite':>10}{'PostgreSQL':>12}{'PG/SQLite':>11}")
    rows = [
        ("submit->RUNNING p50 ms", lambda r: percentile(r[0], 0.5) * 1000),
        ("submit->RUNNING p99 ms", lambda r: percentile(r[0], 0.99) * 1000),
        ("step->client p50 ms", lambda r: percentile(r[1], 0.5) * 1000),
        ("step->client p99 ms", lambda r: percentile(r[1], 0.99) * 1000),
        ("claims/s, 8 workers", lambda r: r[2]),
    ]
    for label, value in rows:
        s, p = value(results["sqlite"]), value(results["postgresql"])
        print(f"{label:<28}{s:>10.1f}{p:>12.1f}{p / s:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
