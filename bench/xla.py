"""XLA or TensorFlow's own kernels on the CPU, for each example job, through `train()`.

Keras leaves XLA off on a machine without a GPU. The service's `runtime.jit_compile: auto`
turns it on for models made only of dense-type layers; this is the measurement behind that
choice. Each example runs with `jit_compile` false and true, alternating, over the span the
engine trains (model built -> last step, tracing and XLA compilation included). Evaluation,
early stopping and targets are off, so every run trains the same number of steps.

  python bench/xla.py [--rounds 2] [--examples mnist_mlp,linear_regression,cnn,lstm_sequence]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from stepstream.kernel.spec import load_spec
from stepstream_service.engine.datasets import DataPaths
from stepstream_service.engine.trainer import train

EXAMPLES = Path(__file__).parents[1] / "examples"


def run(name: str, jit: bool) -> tuple[float, float | None]:
    """(steps/s over the training span, test accuracy)."""
    spec = load_spec(EXAMPLES / f"{name}.yaml").model_copy(deep=True)
    spec.runtime.jit_compile = jit
    spec.training.eval_every = None
    spec.training.early_stopping = None
    spec.training.target = None
    events: list = []
    with tempfile.TemporaryDirectory() as workdir:
        result = train(spec, events.append, workdir=workdir, paths=DataPaths(download=False))
    assert result.outcome == "succeeded", result
    steps = [e for e in events if e.kind == "step"]
    built = next(e for e in events if e.kind == "log" and e.message.startswith("built"))
    assert ("compiled with XLA" in built.message) is jit, built.message
    return len(steps) / (steps[-1].time - built.time), result.test_metrics.get("accuracy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--examples", default="mnist_mlp,linear_regression,cnn,lstm_sequence")
    args = parser.parse_args()
    names = args.examples.split(",")
    run(names[0], False)  # the first run in a process also pays TensorFlow's start-up
    rates: dict[tuple[str, bool], list[float]] = {(n, j): [] for n in names for j in (False, True)}
    accuracy: dict[tuple[str, bool], float | None] = {}
    for r in range(args.rounds):
        for name in names:
            for jit in (False, True):
                sps, acc = run(name, jit)
                rates[name, jit].append(sps)
                accuracy[name, jit] = acc
                print(f"round {r + 1}: {name} jit_compile={jit}: {sps:.0f} steps/s", flush=True)
    print(f"\n{'example':<20}{'no XLA':>10}{'XLA':>10}{'XLA / no XLA':>14}   test accuracy")
    for name in names:
        plain, xla = (statistics.median(rates[name, j]) for j in (False, True))
        accs = " / ".join(
            "-" if accuracy[name, j] is None else f"{accuracy[name, j]:.4f}" for j in (False, True)
        )
        print(f"{name:<20}{plain:>10.0f}{xla:>10.0f}{xla / plain:>14.2f}   {accs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
