"""One job on one device against the same job data-parallel on two logical CPU devices
(runtime.devices: 2), and on two workers (runtime.machines: 2, two processes talking over
gRPC on loopback, as two machines would), through the engine's `train()`, at the same
global batch.

The seed MLP (examples/mnist_mlp.yaml) and the CNN example (examples/cnn.yaml) on
Fashion-MNIST, each run in a process of its own (the CPU split must come before TensorFlow
starts). Throughput is steps per second over the fit, tracing included, from the step events'
own timing: the median of the per-window rates after the first 20 steps.

    python bench/distributed.py [--steps 400]

Two logical CPU devices, or two processes, share the same cores, so this measures what
splitting a job costs, not a speed-up: it is how runtime.devices and runtime.machines are
tested without GPUs. On GPUs each replica has a device of its own; across machines, each its
machine's cores and network.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"seed MLP": "examples/mnist_mlp.yaml", "CNN": "examples/cnn.yaml"}


def child(example: str, devices: int, steps: int, rank: int | None, addresses: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from stepstream_service.engine.distribution import Cluster, split_cpu

    cluster = None
    if rank is None:
        split_cpu(devices)
    else:
        cluster = Cluster(tuple(addresses.split(",")), rank)
    import yaml

    from stepstream.kernel.spec import JobSpec
    from stepstream_service.engine.trainer import train

    raw = yaml.safe_load((ROOT / example).read_text())
    raw["training"].update(steps=steps)
    for interval in ("eval_every", "checkpoint_every"):  # the training alone
        raw["training"].pop(interval, None)
    machines = devices if cluster is not None else 1
    raw["runtime"] = {**raw.get("runtime", {}), "devices": devices, "machines": machines}
    spec = JobSpec.parse(raw)
    events: list = []
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train(spec, events.append, workdir=workdir, tensorboard=False, cluster=cluster)
        wall = time.perf_counter() - t0
    steps_seen = [e for e in events if e.kind == "step"]
    rates = [e.steps_per_second for e in steps_seen if e.step > 20]
    print(
        json.dumps(
            {
                "outcome": result.outcome,
                "steps": len(steps_seen),
                "steps_per_second": statistics.median(rates),
                "batch": spec.training.batch_size,
                "test_accuracy": result.test_metrics.get("accuracy"),
                "wall": wall,
            }
        )
    )


def free_ports(n: int) -> list[int]:
    ports = []
    for _ in range(n):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    return ports


def run(example: str, devices: int, steps: int, machines: int) -> dict:
    """One configuration: a process, or one per machine (rank 0's figures)."""
    command = [sys.executable, __file__, "--steps", str(steps), "--child", example, str(devices)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if machines == 1:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])
    addresses = ",".join(f"127.0.0.1:{p}" for p in free_ports(machines))
    ranks = [
        subprocess.Popen(
            [*command, "--rank", str(r), "--addresses", addresses],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(machines)
    ]
    outs = [p.communicate()[0] for p in ranks]
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--child", nargs=2, metavar=("EXAMPLE", "DEVICES"))
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--addresses", default="")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.steps, args.rank, args.addresses)
        return
    print(
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable); "
        f"{args.steps} steps each"
    )
    rows = []
    # (devices, machines): one device; two logical devices in one process; two processes.
    configurations = [(1, 1), (2, 1), (2, 2)]
    for name, example in EXAMPLES.items():
        measured = {c: run(example, c[0], args.steps, c[1]) for c in configurations}
        rows.append((name, measured))
    print(
        f"{'model':10} {'devices':>7} {'workers':>7} {'batch':>5} {'steps/s':>8} "
        f"{'examples/s':>10} {'wall s':>7}"
    )
    for name, measured in rows:
        for (devices, machines), m in measured.items():
            sps = m["steps_per_second"]
            print(
                f"{name:10} {devices:>7} {machines:>7} {m['batch']:>5} {sps:>8.1f} "
                f"{sps * m['batch']:>10.0f} {m['wall']:>7.1f}"
            )
        one = measured[(1, 1)]["steps_per_second"]
        print(
            f"{name:10} throughput against one device: 2 devices "
            f"{measured[(2, 1)]['steps_per_second'] / one:.2f}, 2 workers "
            f"{measured[(2, 2)]['steps_per_second'] / one:.2f}"
        )


if __name__ == "__main__":
    main()
