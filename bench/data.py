"""Streamed file data against the same arrays in memory, and the peak memory of a dataset
larger than a memory cap.

  python bench/data.py --rows 50000 --rounds 3      # steps/s: CSV streamed vs in memory
  python bench/data.py --big-mib 1024 --margin-mib 256   # a CSV 4x what the cap leaves

The first trains the same MLP with the same batch on the same rows, in memory and streamed
(dataset.stream false and true), alternately for --rounds rounds, and prints the median
steps/s of each and their ratio.

The second measures, in a child process, the baseline of the job itself: the same streamed
job on a small CSV (TensorFlow, Python, the model, the shuffle buffer), its peak RSS and
address space. It then caps a second child's address space (prlimit --as, an RLIMIT_AS that the
worker's memory check reads too) at that address space plus --margin-mib, and trains one epoch
of a CSV of --big-mib there with `stream` unset, so the loader's own rule (arrays only when they
take a small share of the free memory) decides under the cap. It prints the baseline, the peak,
the file's size and file / (peak - baseline); a run that did not stream, or failed, fails.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FEATURES = 16
MiB = 2**20


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` rows of FEATURES inputs and a label; past 100,000 rows the first 100,000 repeat
    (the bytes to parse are what counts here, not their variety)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(FEATURES)
    x = rng.standard_normal((min(rows, 100_000), FEATURES)).astype(np.float32)
    y = (x @ w > 0).astype(int)
    lines = [",".join(f"{v:.4f}" for v in r) + f",{c}\n" for r, c in zip(x, y, strict=True)]
    with path.open("w") as f:
        f.write(",".join(f"f{i}" for i in range(FEATURES)) + ",y\n")
        block = "".join(lines)
        for _ in range(rows // len(lines)):
            f.write(block)
        f.write("".join(lines[: rows % len(lines)]))


def run(data_dir: Path, stream: bool | None, steps: int | None, batch: int) -> dict:
    from stepstream.kernel.spec import JobSpec
    from stepstream_service.engine.datasets import DataPaths
    from stepstream_service.engine.trainer import train

    training = {"batch_size": batch, **({"steps": steps} if steps else {"epochs": 1})}
    spec = JobSpec.model_validate(
        {
            "model": {"architecture": "mlp", "hidden_units": [64]},
            "dataset": {
                "name": "csv",
                "path": "uploads/d.csv",
                "label": "y",
                "stream": stream,
                "evaluate_on_test": False,
            },
            "training": training,
        }
    )
    events: list = []
    t0 = time.perf_counter()
    result = train(
        spec,
        events.append,
        workdir=data_dir / f"w{stream}-{time.monotonic_ns()}",
        paths=DataPaths(data_dir=data_dir),
        tensorboard=False,
    )
    wall = time.perf_counter() - t0
    steps_done = [e for e in events if e.kind == "step"]
    # Training speed: the steps after the first tenth, so loading and compiling are left out.
    late = steps_done[len(steps_done) // 10 :]
    rate = (len(late) - 1) / max(late[-1].time - late[0].time, 1e-9) if len(late) > 1 else 0.0
    status = Path("/proc/self/status").read_text()
    vm_peak = next(int(line.split()[1]) * 1024 for line in status.splitlines() if "VmPeak" in line)
    loaded = next((e.message for e in events if e.kind == "log" and "loaded" in e.message), "")
    return {
        "outcome": result.outcome,
        "failure": str(result.failure) if result.failure else None,
        "steps": result.steps,
        "steps_per_s": rate,
        "wall_s": wall,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "vm_peak": vm_peak,
        "streamed": loaded.endswith("streamed"),
    }


def child(data_dir: Path, batch: int, stream: str, cap: int | None = None) -> dict:
    command = [sys.executable, __file__, "--child", str(data_dir), "--batch", str(batch)]
    command += ["--stream", stream]
    if cap:
        command = ["prlimit", f"--as={cap}", *command]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        sys.exit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def big(args: argparse.Namespace, d: Path) -> None:
    small = d / "small"
    (small / "uploads").mkdir(parents=True)
    # The baseline: the same streamed job on a CSV that fills the shuffle buffer a few times.
    write_csv(small / "uploads" / "d.csv", 50_000)
    base = child(small, args.batch, "true")
    (d / "uploads").mkdir()
    rows = args.big_mib * MiB // (FEATURES * 8)
    write_csv(d / "uploads" / "d.csv", rows)
    size = (d / "uploads" / "d.csv").stat().st_size
    cap = base["vm_peak"] + args.margin_mib * MiB
    got = child(d, args.batch, "auto", cap)
    growth = max(got["peak_rss"] - base["peak_rss"], 1)
    print(
        f"baseline (the same job on a {50_000:,}-row CSV): peak RSS "
        f"{base['peak_rss'] / MiB:.0f} MiB, address space {base['vm_peak'] / MiB:.0f} MiB\n"
        f"cap: RLIMIT_AS {cap / MiB:.0f} MiB = baseline address space + {args.margin_mib} MiB\n"
        f"CSV {size / MiB:.0f} MiB, {rows:,} rows, one epoch, stream unset: {got['outcome']} "
        f"after {got['steps']} steps in {got['wall_s']:.0f} s, "
        f"{'streamed' if got['streamed'] else 'read into memory'}\n"
        f"peak RSS {got['peak_rss'] / MiB:.0f} MiB (growth over the baseline "
        f"{growth / MiB:.0f} MiB); file / growth = {size / growth:.1f}; "
        f"file / (cap - baseline) = {size / (args.margin_mib * MiB):.1f}"
    )
    if got["outcome"] != "succeeded" or not got["streamed"]:
        sys.exit(f"the run under the cap did not stream to completion: {got}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=0)
    ap.add_argument("--margin-mib", type=int, default=256)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--stream", choices=["true", "auto"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        stream = True if args.stream == "true" else None
        print(json.dumps(run(Path(args.child), stream, None, args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if args.big_mib:
            big(args, d)
            return
        (d / "uploads").mkdir()
        write_csv(d / "uploads" / "d.csv", args.rows)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for stream in (False, True):
                rates[stream].append(run(d, stream, args.steps, args.batch)["steps_per_s"])
        memory, streamed = (statistics.median(rates[s]) for s in (False, True))
        print(
            f"{args.rows:,} rows, MLP 64, batch {args.batch}, {args.steps} steps, "
            f"{args.rounds} rounds (median): in memory {memory:.0f} steps/s "
            f"{[round(r) for r in rates[False]]}; streamed {streamed:.0f} steps/s "
            f"{[round(r) for r in rates[True]]}; ratio {streamed / max(memory, 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
