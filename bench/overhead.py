"""What streaming every step costs: the seed MLP job through `train()` against bare Keras.

The seed MLP (784-150 tanh-10, softmax cross-entropy on logits, Adam 4e-3, batch 100, 5001 steps)
on Fashion-MNIST, run in alternating rounds in one process:

  bare-numpy-spe{K}   model.fit(x, y) on numpy arrays, steps_per_execution=K (what a person writes)
  bare-tfdata-spe{K}  model.fit on a repeated tf.data pipeline, steps_per_execution=K
  ...-xla             the same with jit_compile=True (Keras leaves XLA off on a CPU-only machine)
  naive-callback      bare fit with a per-step callback reading loss and accuracy (the naive way)
  train()             the service's engine, every step emitted as an event and written to
                      TensorBoard event files, as the service runs it (XLA: its own choice)
  train()-no-xla      the same with runtime.jit_compile: false
  train()-no-tensorboard  train() without its TensorBoard files (what they cost)

Throughput is steps per second over the whole fit, tracing included, for every contender. The
ratios compare train()'s best round with the best round of the best bare configuration, once
among Keras's defaults (no XLA on the CPU) and once among the XLA ones.

    python bench/overhead.py [--rounds 5] [--steps 5001]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from stepstream.kernel.spec import load_spec
from stepstream_service.engine import datasets
from stepstream_service.engine.trainer import train

SPEC = os.path.join(os.path.dirname(__file__), "..", "examples", "mnist_mlp.yaml")


def seed_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    hidden = keras.layers.Dense(150, activation="tanh")(inputs)
    return keras.Model(inputs, keras.layers.Dense(10)(hidden))


def compiled(spe: int, jit: bool = False) -> keras.Model:
    model = seed_model()
    model.compile(
        optimizer=keras.optimizers.Adam(0.004),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=spe,
        jit_compile=jit,
    )
    return model


def bare_numpy(x, y, steps, spe, jit=False):
    model = compiled(spe, jit)
    epochs = -(-steps * 100 // len(x))  # whole epochs covering `steps`
    done = epochs * -(-len(x) // 100)
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=100, epochs=epochs, verbose=0)
    return done / (time.perf_counter() - t0)


def bare_tfdata(x, y, steps, spe, jit=False):
    model = compiled(spe, jit)
    t0 = time.perf_counter()  # building the pipeline is part of a hand-written script's cost
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=0)
        .batch(100)
        .repeat()
        .take(steps)
        .prefetch(tf.data.AUTOTUNE)
    )
    model.fit(ds, epochs=1, verbose=0)
    return steps / (time.perf_counter() - t0)


class PerStepReader(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.values = []

    def on_train_batch_end(self, batch, logs=None):
        self.values.append((float(logs["loss"]), float(logs["accuracy"])))


def naive_callback(x, y, steps, spe):
    model = compiled(1)
    t0 = time.perf_counter()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(100)
    ds = ds.repeat().take(steps).prefetch(tf.data.AUTOTUNE)
    reader = PerStepReader()
    model.fit(ds, epochs=1, verbose=0, callbacks=[reader])
    assert len(reader.values) == steps
    return steps / (time.perf_counter() - t0)


def service_train(spec, steps, tensorboard=True):
    events = []
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = train(spec, events.append, workdir=workdir, tensorboard=tensorboard)
        total = time.perf_counter() - t0
    step_events = [e for e in events if e.kind == "step"]
    assert len(step_events) == steps and result.outcome == "succeeded", result
    built = next(e for e in events if e.kind == "log" and e.message.startswith("built"))
    # From the moment the model exists to the last step: window sizing, pipeline, tracing and
    # every step, the same span as a bare fit() call (data loading and saving excluded).
    fit_span = step_events[-1].time - built.time
    return steps / fit_span, total, result.test_metrics.get("accuracy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5001)
    args = parser.parse_args()

    spec = load_spec(SPEC).model_copy(deep=True)
    spec.training.steps = args.steps
    spec.training.eval_every = None
    data = datasets.load(spec, datasets.DataPaths(download=False))
    x, y = data.x_train, data.y_train
    print(
        f"seed MLP, {args.steps} steps, batch 100, Fashion-MNIST {x.shape}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} cores"
    )

    bare = {f"bare-numpy-spe{k}": (bare_numpy, k) for k in (1, 50, 100)}
    bare |= {f"bare-tfdata-spe{k}": (bare_tfdata, k) for k in (1, 50, 100)}
    xla = {"bare-numpy-spe50-xla": (bare_numpy, 50), "bare-tfdata-spe100-xla": (bare_tfdata, 100)}
    plain = spec.model_copy(deep=True)
    plain.runtime.jit_compile = False
    contenders = [
        *bare,
        *xla,
        "naive-callback",
        "train()",
        "train()-no-xla",
        "train()-no-tensorboard",
    ]
    results: dict[str, list[float]] = {name: [] for name in contenders}
    accuracy = []
    for r in range(args.rounds):
        for name, (fn, spe) in bare.items():
            results[name].append(fn(x, y, args.steps, spe))
        for name, (fn, spe) in xla.items():
            results[name].append(fn(x, y, args.steps, spe, jit=True))
        results["naive-callback"].append(naive_callback(x, y, args.steps, 1))
        sps, _, acc = service_train(spec, args.steps)
        results["train()"].append(sps)
        accuracy.append(acc)
        results["train()-no-xla"].append(service_train(plain, args.steps)[0])
        results["train()-no-tensorboard"].append(service_train(spec, args.steps, False)[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()))

    print(f"\n{'contender':<24}{'best steps/s':>14}{'median':>10}")
    for name, values in results.items():
        print(f"{name:<24}{max(values):>14.0f}{statistics.median(values):>10.0f}")
    best_bare_name = max(bare, key=lambda n: max(results[n]))
    best_bare = max(results[best_bare_name])
    best_xla_name = max(xla, key=lambda n: max(results[n]))
    best_xla = max(results[best_xla_name])
    ratio = max(results["train()"]) / best_bare
    same = max(results["train()"]) / best_xla
    plain_ratio = max(results["train()-no-xla"]) / best_bare
    naive = max(results["naive-callback"]) / best_bare
    quiet = max(results["train()-no-tensorboard"]) / best_bare
    print(
        f"\ntrain() with every step streamed, TensorBoard on / best bare Keras "
        f"({best_bare_name}): {ratio:.3f}"
    )
    print(f"train() with TensorBoard off / best bare Keras ({best_bare_name}): {quiet:.3f}")
    print(f"train() / best bare Keras with XLA ({best_xla_name}): {same:.3f}")
    print(f"train() without XLA / best bare Keras ({best_bare_name}): {plain_ratio:.3f}")
    print(f"naive per-step callback / best bare Keras: {naive:.3f}")
    print(f"train() test accuracy per round: {', '.join(f'{a:.4f}' for a in accuracy)}")
    print(f"target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
