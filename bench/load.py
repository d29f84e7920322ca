"""A bounded load run on loopback: open-loop CreateJob, many watchers, the server's memory.

submits    CreateJob at --rate per second for --seconds, scheduled by the clock, not by
           completion (open loop): one scheduler thread issues each call as a gRPC future when
           it falls due, round robin over 4 channels (4 connections), so a slow call never
           delays the next one. Tiny jobs (linear, 1 step), each with its own request_id and a
           10 s deadline. Latency is issue -> response, counted per status code.
watchers   --watchers raw-protobuf WatchJob streams in a child process of their own (their
           parsing does not take this process's GIL from the scheduler), spread evenly over 4
           long jobs (2000 steps each) submitted just before the load at priority 1, so they
           train while it runs. Every event's seq must be the previous one + 1 (no gaps, no
           repeats). step->client: receive time minus the step's time on the worker.
memory     RSS of the server process and of its children (the worker) from /proc every 0.5 s;
           with their CPU seconds and the whole machine's, to tell what limited the rate.
end        when the load stops and the calls in flight have answered (or timed out), the
           store is read directly: how many of the load's jobs are in a terminal state, and
           the queue depth; again --drain s (15) after the load's end, for the worker's rate
           and for jobs created whose CreateJob the client saw fail. The watchers stop then.
           Then the server gets SIGTERM, and the run checks that none of its processes is left.

The server is a real `trainer serve --workers 1` subprocess with TRAINER_MAX_QUEUED_PER_TENANT
and TRAINER_MAX_WATCHERS_PER_TENANT raised, so those limits do not turn the load into errors.
Store: a SQLite file in a temp dir; with `--store postgresql://…/postgres` a fresh database is
created on that server for the run and dropped after (as bench/scale.py does); any other URL
is used as it is. The run takes about --seconds + 60 s.

  python bench/load.py [--rate 200] [--seconds 30] [--watchers 100] [--drain 15] [--store URL]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

import grpc

from service import percentile, start_server
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc

TINY = {
    "name": "load",
    "model": "linear",
    "dataset": "linear",
    "training": {"steps": 1, "batch_size": 10},
}
LONG = {
    "name": "load-watched",
    "dataset": {"name": "synthetic_classification", "num_samples": 512, "num_features": 8},
    "model": {"architecture": "mlp", "hidden_units": [16]},
    "training": {"steps": 2000, "batch_size": 32},
}
LONG_JOBS = 4
CHANNELS = 4
DEADLINE = 10.0
ENV = {
    "TRAINER_MAX_QUEUED_PER_TENANT": "100000",
    "TRAINER_MAX_WATCHERS_PER_TENANT": "1000",
}
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel


def request(spec: dict, priority: int = 0) -> pb.CreateJobRequest:
    from stepstream.kernel.spec import load_spec

    return pb.CreateJobRequest(
        spec_json=json.dumps(load_spec(spec).to_dict()),
        request_id=uuid.uuid4().hex,
        priority=priority,
    )


# ---------------------------------------------------------------- the server and its memory


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                out.append(kid)
                todo.append(kid)
    return out


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return 0.0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    total = sum(ticks[:8])
    hz = os.sysconf("SC_CLK_TCK")
    return (total - idle) / hz, total / hz


class RssSampler(threading.Thread):
    """Every `interval` seconds: (time, server MiB, children MiB, server CPU s, children CPU s,
    machine busy CPU s, machine total CPU s)."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, ...]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            kids = descendants(self.pid)
            self.samples.append(
                (
                    time.monotonic(),
                    rss_mib(self.pid),
                    sum(rss_mib(p) for p in kids),
                    cpu_seconds(self.pid),
                    sum(cpu_seconds(p) for p in kids),
                    *machine_cpu(),
                )
            )
            self.done.wait(self.interval)

    def at(self, t: float) -> tuple[float, ...]:
        return min(self.samples, key=lambda s: abs(s[0] - t))


# ---------------------------------------------------------------- watchers (a child process)


def watch_all(address: str, names: list[str], count: int, ready, stop, results) -> None:
    """`count` raw WatchJob streams over `names`, until each job ends or `stop` is set."""
    channels = [grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in names]
    stubs = [trainer_pb2_grpc.TrainerServiceStub(c) for c in channels]
    calls, lock = [], threading.Lock()
    out = []

    def watch(i: int) -> None:
        job = i % len(names)
        seen = {"job": job, "events": 0, "steps": 0, "gaps": 0, "last": 0, "ended": False}
        latencies: list[float] = []
        seen["latencies"] = latencies
        call = stubs[job].WatchJob(pb.WatchJobRequest(name=names[job]))
        with lock:
            calls.append(call)
        try:
            for response in call:
                if response.WhichOneof("kind") != "batch":
                    continue
                now = time.time()
                for e in response.batch.events:
                    if e.seq != seen["last"] + 1:
                        seen["gaps"] += 1
                    seen["last"] = e.seq
                    seen["events"] += 1
                    which = e.WhichOneof("payload")
                    if which == "step":
                        seen["steps"] += 1
                        latencies.append(now - e.time.ToNanoseconds() / 1e9)
                    elif which == "state_change" and e.state_change.state in TERMINAL:
                        seen["ended"] = True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                seen["error"] = exc.code().name
        out.append(seen)

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    ready.set()
    while any(t.is_alive() for t in threads) and not stop.wait(0.2):
        pass
    with lock:
        for call in calls:
            call.cancel()
    for t in threads:
        t.join(timeout=5)
    results.put(out)
    for c in channels:
        c.close()


TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


# ---------------------------------------------------------------- the open-loop submitter


class Submitter:
    """CreateJob at `rate` per second for `seconds`, each call issued when it falls due."""

    def __init__(self, address: str, rate: float, seconds: float):
        self.rate, self.seconds = rate, seconds
        self.channels = [
            grpc.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(CHANNELS)
        ]
        self.stubs = [trainer_pb2_grpc.TrainerServiceStub(c) for c in self.channels]
        self.template = request(TINY)
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.calls: list[tuple[float, float, str]] = []  # (issued after start s, latency, code)
        self.names: list[str] = []
        self.issued = 0
        self.late: list[float] = []  # how far behind schedule each call was issued
        self.answered = threading.Semaphore(0)

    def _done(self, future, issued: float) -> None:
        took = time.perf_counter() - issued
        try:
            name, code = future.result().name, "OK"
        except grpc.RpcError as exc:
            name, code = None, exc.code().name
        with self.lock:
            self.latency[code].append(took)
            self.calls.append((issued - self.start, took, code))
            if name:
                self.names.append(name)
        self.answered.release()

    def run(self) -> float:
        """Issue every call; return when the last one was issued (perf_counter)."""
        stubs = itertools.cycle(self.stubs)
        start = self.start = time.perf_counter()
        for i in range(int(self.rate * self.seconds)):
            due = start + i / self.rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            req = pb.CreateJobRequest()
            req.CopyFrom(self.template)
            req.request_id = uuid.uuid4().hex
            issued = time.perf_counter()
            self.late.append(issued - due)
            future = next(stubs).CreateJob.future(req, timeout=DEADLINE)
            future.add_done_callback(lambda f, t=issued: self._done(f, t))
            self.issued += 1
        return time.perf_counter() - start

    def drain(self) -> None:
        """Every call answered (at most DEADLINE after it was issued)."""
        for _ in range(self.issued):
            self.answered.acquire(timeout=DEADLINE + 5)

    def close(self) -> None:
        for c in self.channels:
            c.close()


# ---------------------------------------------------------------- the run


def tally(store_url: str, names: list[str], long_jobs: list[str]) -> dict:
    from stepstream_service.store import Store

    store = Store(store_url, create=False)
    try:
        rows = store.list_jobs(name="load", limit=10_000_000)
        states = {j.id: j.state.value for j in rows}
        depth = store.queue_depth()
        long_states = [store.get_job(n.removeprefix("jobs/")).state.value for n in long_jobs]
    finally:
        store.close()
    ids = [n.removeprefix("jobs/") for n in names]
    terminal = ("SUCCEEDED", "FAILED", "CANCELLED")
    return {
        "terminal": sum(1 for i in ids if states.get(i) in terminal),
        "failed": sum(1 for i in ids if states.get(i) in ("FAILED", "CANCELLED")),
        "unanswered": len(set(states) - set(ids)),  # created, but the client saw an error
        "depth": depth,
        "long": long_states,
    }


def run(args: argparse.Namespace, store_url: str, tmp: Path) -> int:
    log = tmp / "server.log"
    proc, address = start_server(tmp / "data", store_url, env=ENV, log=log)
    sampler = RssSampler(proc.pid)
    sampler.start()
    ctx = multiprocessing.get_context("spawn")
    stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
    watchers = None
    submitter = None
    try:
        channel = grpc.insecure_channel(address)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        warm = stub.CreateJob(request(TINY | {"name": "warm-up"}), timeout=30).name
        began = time.monotonic()
        while stub.GetJob(pb.GetJobRequest(name=warm), timeout=10).state not in TERMINAL:
            assert time.monotonic() - began < 120, "the worker did not warm up"
            time.sleep(0.1)
        long_jobs = [
            stub.CreateJob(request(LONG, priority=1), timeout=30).name for _ in range(LONG_JOBS)
        ]
        watchers = ctx.Process(
            target=watch_all, args=(address, long_jobs, args.watchers, ready, stop, results)
        )
        watchers.start()
        assert ready.wait(60), "the watchers did not start"
        time.sleep(1.0)  # their streams are open
        print(
            f"load: {args.rate:g} CreateJob/s for {args.seconds:g} s, {args.watchers} watchers "
            f"on {LONG_JOBS} jobs of {LONG['training']['steps']} steps, store "
            f"{store_url.split('://')[0]}",
            flush=True,
        )

        load_start = time.monotonic()
        submitter = Submitter(address, args.rate, args.seconds)
        issuing = submitter.run()
        load_end = time.monotonic()
        submitter.drain()
        answered = time.monotonic()
        counts = tally(store_url, submitter.names, long_jobs)
        time.sleep(max(load_end + args.drain - time.monotonic(), 0))
        drained = time.monotonic()
        after = tally(store_url, submitter.names, long_jobs)
        stop.set()
        watched = results.get(timeout=30)
        watchers.join(timeout=10)
        channel.close()
    finally:
        stop.set()
        if watchers is not None and watchers.is_alive():
            watchers.terminate()
            watchers.join(timeout=5)
        if submitter is not None:
            submitter.close()
        left = stop_server(proc)
        sampler.done.set()
        sampler.join()

    # ------------------------------------------------------------ the report
    ms = 1000
    lat = submitter.latency
    ok = lat.get("OK", [])
    every = [x for values in lat.values() for x in values]
    errors = {code: len(v) for code, v in lat.items() if code != "OK"}
    print(
        f"\nsubmits: {submitter.issued} attempted, {len(ok)} succeeded, errors {errors or 'none'}"
    )
    print(
        f"rate: {submitter.issued / issuing:.1f}/s issued (target {args.rate:g}); "
        f"{len(ok) / (answered - load_start):.1f}/s answered OK over "
        f"{answered - load_start:.1f} s (the load + its last answers); issue lag behind the "
        f"schedule p99 {percentile(submitter.late, 0.99) * ms:.1f} ms, "
        f"max {max(submitter.late) * ms:.1f} ms"
    )
    for label, values in (("all", every), ("OK", ok)):
        print(
            f"CreateJob latency ms ({label}, {len(values)}): "
            f"p50 {percentile(values, 0.5) * ms:.1f}  p90 {percentile(values, 0.9) * ms:.1f}  "
            f"p99 {percentile(values, 0.99) * ms:.1f}  max {max(values, default=0) * ms:.1f}"
        )
    windows = collections.defaultdict(list)
    for issued, took, _ in submitter.calls:
        windows[int(issued // 5) * 5].append(took)
    print(
        "  by issue time, p50/p99 ms: "
        + ", ".join(
            f"{w}-{w + 5} s {percentile(v, 0.5) * ms:.0f}/{percentile(v, 0.99) * ms:.0f}"
            for w, v in sorted(windows.items())
        )
    )

    steps = [x for w in watched for x in w["latencies"]]
    werrors = collections.Counter(w.get("error") for w in watched if w.get("error"))
    print(
        f"watchers: {len(watched)}/{args.watchers} reported, "
        f"{sum(w['events'] for w in watched)} events ({len(steps)} steps), "
        f"gaps or repeats {sum(w['gaps'] for w in watched)}, "
        f"{sum(w['ended'] for w in watched)} saw their job's terminal event, "
        f"errors {dict(werrors) or 'none'}"
    )
    per_job = collections.defaultdict(collections.Counter)
    for w in watched:
        per_job[w["job"]][(w["events"], w["steps"], w["ended"])] += 1
    for job in sorted(per_job):
        seen = ", ".join(
            f"{n} got {e} events/{s} steps{' to the end' if end else ''}"
            for (e, s, end), n in sorted(per_job[job].items())
        )
        print(f"  long job {job + 1} ({after['long'][job]} when they stopped): {seen}")
    print(
        f"step->client ms: p50 {percentile(steps, 0.5) * ms:.1f}  "
        f"p99 {percentile(steps, 0.99) * ms:.1f}  max {max(steps, default=0) * ms:.1f}"
    )

    s0, s1, s2 = sampler.at(load_start), sampler.at(load_end), sampler.at(drained)
    during = [s for s in sampler.samples if load_start <= s[0] <= drained] or [s2]
    for label, i in (("server", 1), ("worker (its children)", 2)):
        print(
            f"{label} RSS MiB: start {s0[i]:.0f}, peak {max(s[i] for s in during):.0f}, "
            f"at the load's end {s1[i]:.0f}, {args.drain:g} s later {s2[i]:.0f}"
        )
    span = s1[0] - s0[0]
    print(
        f"CPU over the load ({span:.1f} s): server {s1[3] - s0[3]:.1f} s "
        f"({(s1[3] - s0[3]) / span:.0%} of a core), worker {s1[4] - s0[4]:.1f} s "
        f"({(s1[4] - s0[4]) / span:.0%}); the whole machine (every process on it) busy "
        f"{(s1[5] - s0[5]) / (s1[6] - s0[6]):.0%} of its {os.cpu_count()} cores"
    )

    def depth(c: dict) -> dict:
        return {k: v for k, v in c["depth"].items() if v}

    print(
        f"jobs: {counts['terminal']} of the {len(ok)} submitted (OK) in a terminal state when "
        f"the last answer came, {answered - load_end:.1f} s after the load "
        f"({counts['failed']} failed or cancelled); queue depth {depth(counts)}"
    )
    done = after["terminal"] - counts["terminal"]
    print(
        f"  {drained - load_end:.1f} s after the load: {after['terminal']} "
        f"({done / (drained - answered):.1f} jobs/s in between); queue depth {depth(after)}; "
        f"jobs created whose client saw an error: {after['unanswered']}"
    )
    problems = [
        line.rstrip()
        for line in log.read_text().splitlines()
        if line.startswith(("ERROR", "CRITICAL", "Traceback", "WARNING"))
    ]
    print(
        f"server log: {len(problems)} warning or error lines"
        + "".join(f"\n  {line[:160]}" for line in problems[:5])
    )
    print(f"left running after SIGTERM: {left or 'nothing'}")
    return 0


def stop_server(proc: subprocess.Popen) -> list[int]:
    """SIGTERM, then wait; whatever of its process group is still there is killed and named."""
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    left = [p for p in family if Path(f"/proc/{p}").exists()]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in family if Path(f"/proc/{p}").exists()]
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this run started, by its id
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument(
        "--drain", type=float, default=15, help="seconds after the load to count finished jobs"
    )
    parser.add_argument("--store", help="a store URL; postgresql://…/db: a fresh database there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.store and args.store.startswith(("postgresql", "postgres")):
            import scale

            scale.ADMIN = args.store
            db = scale.Database("postgresql", tmp)
            print(f"database {db.name} on {args.store} (dropped after the run)", flush=True)
            try:
                return run(args, db.url, tmp)
            finally:
                for attempt in range(10):  # the database server may be restarting
                    try:
                        db.drop()
                        break
                    except Exception as exc:
                        if attempt == 9:
                            print(f"could not drop {db.name}: {exc}", file=sys.stderr)
                        time.sleep(3)
        return run(args, args.store or f"sqlite:///{tmp / 'trainer.db'}", tmp)


if __name__ == "__main__":
    sys.exit(main())
