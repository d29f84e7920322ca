"""One job on one device against the same job data-parallel on two logical CPU devices
(runtime.devices: 2), through the engine's `train()`, at the same global batch.

The seed MLP (examples/mnist_mlp.yaml) and the CNN example (examples/cnn.yaml) on
Fashion-MNIST, each run in a process of its own (the CPU split must come before TensorFlow
starts). Throughput is steps per second over the fit, tracing included, from the step events'
own timing: the median of the per-window rates after the first 20 steps.

    python bench/distributed.py [--steps 400]

Two logical CPU devices share the same cores, so this measures what splitting a job costs,
not a speed-up: it is how runtime.devices is tested without GPUs. On GPUs each replica has a
device of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {"seed MLP": "examples/mnist_mlp.yaml", "CNN": "examples/cnn.yaml"}


def child(example: str, devices: int, steps: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from stepstream_service.engine.distribution import split_cpu

    split_cpu(devices)
    import yaml

    from stepstream.kernel.spec import JobSpec
    from stepstream_service.engine.trainer import train

    raw = yaml.safe_load((ROOT / example).read_text())
    raw["training"].update(steps=steps)
    for interval in ("eval_every", "checkpoint_every"):  # the training alone
        raw["training"].pop(interval, None)
    raw["runtime"] = {**raw.get("runtime", {}), "devices": devices}
    spec = JobSpec.parse(raw)
    events: list = []
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train(spec, events.append, workdir=workdir, tensorboard=False)
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--child", nargs=2, metavar=("EXAMPLE", "DEVICES"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.steps)
        return
    print(
        f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable); "
        f"{args.steps} steps each"
    )
    rows = []
    for name, example in EXAMPLES.items():
        measured = {}
        for devices in (1, 2):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--steps",
                    str(args.steps),
                    "--child",
                    example,
                    str(devices),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )
            measured[devices] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((name, measured))
    print(
        f"{'model':10} {'devices':>7} {'batch':>5} {'steps/s':>8} {'examples/s':>10} {'wall s':>7}"
    )
    for name, measured in rows:
        for devices, m in measured.items():
            sps = m["steps_per_second"]
            print(
                f"{name:10} {devices:>7} {m['batch']:>5} {sps:>8.1f} {sps * m['batch']:>10.0f} "
                f"{m['wall']:>7.1f}"
            )
        ratio = measured[2]["steps_per_second"] / measured[1]["steps_per_second"]
        print(f"{name:10} 2-device/1-device throughput: {ratio:.2f}")


if __name__ == "__main__":
    main()
