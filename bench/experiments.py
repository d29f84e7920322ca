"""Experiments: a 27-point grid over the seed MLP, in full and with ASHA, beside Ray Tune.

One run on this machine, each contender on the same cores in turn:

grid        a real `trainer serve` (SQLite in a temporary folder, --workers CPU workers) runs
            an experiment through `TrainingClient.submit_experiment`: the seed MLP (784-H tanh
            -10, Adam, softmax cross-entropy on logits, Fashion-MNIST with a 10% validation
            split) over learning rate {0.001, 0.004, 0.016} x hidden_units {[64], [150], [300]}
            x batch_size {50, 100, 200}, --steps S each (default 1500), evaluated every S/10
            steps; sampler grid, pruner none, max_concurrent_trials = workers. The objective is
            test_accuracy (max): the service keeps the succeeded trial with the best.
ASHA        the same grid on the same server with pruner asha (min_steps = S/10,
            reduction_factor 3): the trials that fall behind on validation accuracy at an
            evaluation are cancelled there.
Ray Tune    the same 27 points with ray.tune.schedulers.ASHAScheduler(time_attr="step",
            max_t=S, grace_period=S/10, reduction_factor=3) in this machine's Ray
            (ray.init(num_cpus=workers), 1 CPU per trial, max_concurrent_trials=workers):
            each trial a plain Keras model of the same shape, compiled the same way, fit on the
            same arrays (the service's loader and split), reporting validation accuracy to
            Tune every S/10 steps and its test accuracy with its last report. A Trainable
            class with reset_config and reuse_actors=True, so each actor and the TensorFlow
            it imported serve trial after trial: Ray at its best, not its default.
turnaround  a one-worker server and N short trials of one shape submitted at once (the linear
            example, 10 steps, each with its own learning rate): jobs per second from the
            first submit to the last job's end, on a worker warmed by one job first. Before:
            TRAINER_MODEL_CACHE_MIB=0, so the worker builds, compiles and traces each job's
            model; after: the default, so it reuses the program traced for the first (see
            engine/model_cache.py). Two servers of each, alternated; the better of each.

For each search: trials succeeded and pruned, training steps actually run (the sum over its
trials' jobs of the step each reached, so a pruned trial counts the steps it trained before
the cancel took hold; for Ray, the last step each trial reported), wall time (submit to
end; Ray: Tuner.fit, ray.init apart), the best test accuracy among trials that ran to the end
(what the service's objective picks), and the test accuracy of the trial with the best final
validation accuracy (how a search is chosen without peeking at the test set).

Target: ASHA's best within 0.5 points of the grid's best at <= 1/3 of the grid's steps. The
last two lines printed are `steps ratio (asha/grid): R` and `accuracy gap (grid - asha): G
points` (G in percentage points of test accuracy).

Ray Tune is a benchmark-only dependency: `.venv/bin/pip install "ray[tune]"`, or --skip-ray.
--quick is a smoke run, not a measurement: 300 steps, one batch size (9 points), 5 tiny jobs.

  .venv/bin/python bench/experiments.py [--workers 2] [--steps 1500] [--turnaround-jobs 30]
                                        [--turnaround-only]
                                        [--skip-ray] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune prints no tables
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from stepstream.client import TrainingClient
from stepstream.kernel.spec import load_spec

EXAMPLES = Path(__file__).parents[1] / "examples"
SEED = EXAMPLES / "mnist_mlp.yaml"
LINEAR = EXAMPLES / "linear_regression.yaml"
LEARNING_RATES = [0.001, 0.004, 0.016]
HIDDEN_UNITS = [[64], [150], [300]]
BATCH_SIZES = [50, 100, 200]
VALIDATION_SPLIT = 0.1
# Evaluations per trial: ASHA's first rung (grace period) is one of them, for both searches.
EVALS = 10
RAY_MISSING = (
    "Ray Tune is not installed; it is a benchmark-only dependency: "
    '.venv/bin/pip install "ray[tune]" (or run with --skip-ray)'
)


@dataclass
class Search:
    """One search's outcome, whoever ran it."""

    label: str
    trials: int
    succeeded: int
    pruned: int
    steps: int
    wall: float
    best_test: float  # the best test accuracy among trials that ran to the end
    best_test_params: dict[str, Any]
    by_val_test: float | None  # the test accuracy of the best final validation accuracy
    by_val_params: dict[str, Any] | None
    note: str = ""
    overshoot: int | None = None  # steps pruned trials trained past the step they were pruned at


# ---------------------------------------------------------------- the server


def serve(
    folder: Path, workers: int, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`trainer serve` on free ports with `workers` CPU workers and SQLite in `folder`, in a
    process group of its own (nothing of it can outlive the run); its log in folder/serve.log.
    `env`: settings (TRAINER_*) added to this process's environment."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stepstream.cli",
                "serve",
                *("--port", "0", "--metrics-port", "0"),
                *("--workers", str(workers), "--gpus", "none"),
                *("--store", f"sqlite:///{folder / 'jobs.db'}"),
                *("--data-dir", str(folder / "data")),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    match = re.search(r"grpc (\S+:\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start; see {log}:\n{log.read_text()[-2000:]}")
    return proc, match.group(1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


# ---------------------------------------------------------------- the search space


def space(quick: bool) -> dict[str, list[Any]]:
    """Dotted job field -> its values. --quick keeps one batch size (9 points)."""
    return {
        "optimizer.learning_rate": LEARNING_RATES,
        "model.hidden_units": HIDDEN_UNITS,
        "training.batch_size": [100] if quick else BATCH_SIZES,
    }


def base_job(steps: int) -> dict[str, Any]:
    """The seed MLP job with `steps` steps, evaluated every tenth of them on a validation split
    (so pruning never reads the test set)."""
    job = load_spec(SEED).to_dict()
    job["training"].update(steps=steps, eval_every=steps // EVALS)
    dataset = job["dataset"] if isinstance(job["dataset"], dict) else {"name": job["dataset"]}
    job["dataset"] = {**dataset, "validation_split": VALIDATION_SPLIT}
    return job


def experiment(name: str, steps: int, grid: dict[str, list], workers: int, asha: bool) -> dict:
    pruner: Any = "none"
    if asha:
        pruner = {"name": "asha", "min_steps": steps // EVALS, "reduction_factor": 3}
    return {
        "name": name,
        "job": base_job(steps),
        "space": {path: {"choice": values} for path, values in grid.items()},
        "sampler": "grid",
        "pruner": pruner,
        "objective": {"metric": "test_accuracy", "mode": "max"},
        "max_concurrent_trials": workers,
    }


def brief(params: dict[str, Any]) -> str:
    short = {
        "optimizer.learning_rate": "lr",
        "model.hidden_units": "hidden",
        "training.batch_size": "batch",
    }
    return " ".join(f"{short.get(k, k)}={v}" for k, v in params.items())


# ---------------------------------------------------------------- through the service


def service_search(client: TrainingClient, label: str, spec: dict, timeout: float) -> Search:
    began = time.perf_counter()
    submitted = client.submit_experiment(spec)
    final = client.wait_experiment(submitted.id, timeout=timeout)
    wall = time.perf_counter() - began
    if final.state != "SUCCEEDED":
        raise SystemExit(f"{label}: experiment {final.id} ended {final.state}: {final.message}")
    steps = overshoot = 0
    succeeded: list[tuple[float, float | None, dict]] = []  # (test, last validation, params)
    for trial in final.trials:
        job = client.job(trial.job_id)
        info = job.info()
        steps += info.step
        if trial.state == "PRUNED":
            overshoot += max(info.step - trial.step, 0)
        if trial.state == "SUCCEEDED":
            evals = [e for e in job.metrics().evals if e.split == "validation"]
            last_val = evals[-1].values.get("accuracy") if evals else None
            succeeded.append((info.test_metrics["accuracy"], last_val, trial.params))
    if not succeeded:
        raise SystemExit(f"{label}: no trial succeeded")
    best_test, _, best_params = max(succeeded, key=lambda s: s[0])
    if final.best_value is not None and abs(final.best_value - best_test) > 1e-9:
        print(f"  note: the service's best value {final.best_value} is not the jobs' {best_test}")
    with_val = [s for s in succeeded if s[1] is not None]
    by_val = max(with_val, key=lambda s: s[1]) if with_val else None
    counts = {state: 0 for state in ("SUCCEEDED", "PRUNED")}
    for trial in final.trials:
        counts[str(trial.state)] = counts.get(str(trial.state), 0) + 1
    others = {s: n for s, n in counts.items() if s not in ("SUCCEEDED", "PRUNED") and n}
    return Search(
        label=label,
        trials=len(final.trials),
        succeeded=counts["SUCCEEDED"],
        pruned=counts["PRUNED"],
        steps=steps,
        wall=wall,
        best_test=best_test,
        best_test_params=best_params,
        by_val_test=by_val[0] if by_val else None,
        by_val_params=by_val[2] if by_val else None,
        note=", ".join(f"{n} {s.lower()}" for s, n in others.items()),
        overshoot=overshoot,
    )


def turnaround(client: TrainingClient, jobs: int) -> float:
    """Jobs per second from the first submit to the last end, `jobs` short trials at once:
    one shape, a learning rate each."""
    tiny = load_spec(LINEAR).model_copy(deep=True)
    tiny.training.steps = 10
    client.submit(tiny).wait(timeout=300)  # the worker has imported and built once
    first = time.time()
    handles = []
    for i in range(jobs):
        trial = tiny.model_copy(deep=True)
        trial.optimizer.learning_rate = 0.05 + 0.01 * i
        handles.append(client.submit(trial))
    infos = [h.wait(timeout=600) for h in handles]
    bad = [i for i in infos if i.state != "SUCCEEDED"]
    if bad:
        raise SystemExit(f"turnaround: {len(bad)} tiny job(s) did not succeed: {bad[0]}")
    last = max(i.end_time or time.time() for i in infos)
    return jobs / (last - first)


def turnaround_line(before: float, after: float) -> str:
    return (
        f"short-trial turnaround, jobs/s per worker: {before:.2f} building each, "
        f"{after:.2f} reusing the traced model ({after / before:.2f}x)"
    )


def turnarounds(folder: Path, jobs: int, rounds: int = 2) -> tuple[float, float]:
    """(before, after): the best turnaround of `rounds` one-worker servers each, without and
    with the model cache, alternated so that both see the same machine."""
    rates: dict[str, list[float]] = {"0": [], "256": []}
    for r in range(rounds):
        for mib in rates:
            proc, address = serve(
                folder / f"turnaround-{mib}-{r}", 1, {"TRAINER_MODEL_CACHE_MIB": mib}
            )
            try:
                with TrainingClient(address) as client:
                    rates[mib].append(turnaround(client, jobs))
            finally:
                stop(proc)
            print(f"turnaround, model cache {mib} MiB: {rates[mib][-1]:.2f} jobs/s", flush=True)
    return max(rates["0"]), max(rates["256"])


# ---------------------------------------------------------------- Ray Tune


def arrays(steps: int) -> tuple:
    """The arrays the service's jobs train on: its loader, its validation split, its seed."""
    from stepstream.kernel.spec import JobSpec
    from stepstream_service.engine import datasets

    data = datasets.load(JobSpec.parse(base_job(steps)), datasets.DataPaths(download=False))
    return data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test


def ray_trainable() -> type:
    """A Tune Trainable: the seed MLP's shape in plain Keras, `every` steps a Tune iteration,
    reporting validation accuracy each time and the test accuracy with the last. A class, so
    that Tune can reuse its actor (and the TensorFlow it imported) for the next trial."""
    import keras
    import tensorflow as tf
    from ray import tune

    class KerasTrial(tune.Trainable):
        def setup(self, config: dict, data: tuple = (), steps: int = 0, every: int = 0):
            x, y, self.x_val, self.y_val, self.x_test, self.y_test = data
            self.x, self.y = tf.constant(x), tf.constant(y)
            self.steps, self.every = steps, every
            self.build(config)

        def build(self, config: dict) -> None:
            keras.backend.clear_session()
            keras.utils.set_random_seed(0)
            inputs = keras.Input((self.x.shape[1],))
            hidden = inputs
            for units in config["model.hidden_units"]:
                hidden = keras.layers.Dense(units, activation="tanh")(hidden)
            self.model = keras.Model(inputs, keras.layers.Dense(self.y.shape[1])(hidden))
            self.model.compile(
                optimizer=keras.optimizers.Adam(config["optimizer.learning_rate"]),
                loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )
            self.batch, self.done = config["training.batch_size"], 0

        def chunk(self) -> tf.data.Dataset:
            """The next `every` batches, from a shuffle of the rows seeded by the steps done:
            fit makes a new iterator each call, which would otherwise replay the same rows."""
            rows = int(self.x.shape[0])
            x, y = self.x, self.y
            return (
                tf.data.Dataset.range(rows)
                .shuffle(rows, seed=self.done)
                .repeat()
                .batch(self.batch)
                .take(self.every)
                .map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
                .prefetch(tf.data.AUTOTUNE)
            )

        def step(self) -> dict:
            history = self.model.fit(
                self.chunk(),
                validation_data=(self.x_val, self.y_val),
                validation_batch_size=1000,
                verbose=0,
            )
            self.done += self.every
            out = {"step": self.done, "val_accuracy": history.history["val_accuracy"][-1]}
            if self.done >= self.steps:
                test = self.model.evaluate(self.x_test, self.y_test, batch_size=1000, verbose=0)
                out["test_accuracy"] = float(test[1])
            return out

        def reset_config(self, new_config: dict) -> bool:
            self.build(new_config)
            return True

        # Tune asks for a checkpoint when a trial stops; there is nothing to resume here.
        def save_checkpoint(self, checkpoint_dir: str) -> dict:
            return {}

        def load_checkpoint(self, checkpoint: Any) -> None:
            pass

    return KerasTrial


def ray_search(grid: dict[str, list], steps: int, workers: int, folder: Path) -> Search:
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
    except ImportError:
        raise SystemExit(RAY_MISSING) from None

    every = steps // EVALS
    data = arrays(steps)
    began = time.perf_counter()
    ray.init(
        num_cpus=workers,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        _temp_dir=str(folder / "ray-session"),  # gone with the run's folder
    )
    started = time.perf_counter() - began
    try:
        trainable = tune.with_resources(
            tune.with_parameters(ray_trainable(), data=data, steps=steps, every=every),
            {"cpu": 1},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={path: tune.grid_search(values) for path, values in grid.items()},
            tune_config=tune.TuneConfig(
                metric="val_accuracy",
                mode="max",
                scheduler=ASHAScheduler(
                    time_attr="step", max_t=steps, grace_period=every, reduction_factor=3
                ),
                num_samples=1,
                max_concurrent_trials=workers,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="bench-experiments",
                storage_path=str(folder / "ray"),
                stop={"step": steps},
                verbose=0,
            ),
        )
        began = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - began
    finally:
        ray.shutdown()
    rows = [(r.metrics or {}, {k: r.config[k] for k in grid}, r.error) for r in results]
    done = [(m, p) for m, p, _ in rows if m.get("step", 0) >= steps and "test_accuracy" in m]
    errors = sum(e is not None for m, _, e in rows if "test_accuracy" not in m)
    if not done:
        raise SystemExit("Ray Tune: no trial ran to the end")
    best = max(done, key=lambda d: d[0]["test_accuracy"])
    by_val = max(done, key=lambda d: d[0]["val_accuracy"])
    return Search(
        label="Ray Tune, ASHA",
        trials=len(rows),
        succeeded=len(done),
        pruned=len(rows) - len(done) - errors,
        steps=sum(int(m.get("step", 0)) for m, _, _ in rows),
        wall=wall,
        best_test=best[0]["test_accuracy"],
        best_test_params=best[1],
        by_val_test=by_val[0]["test_accuracy"],
        by_val_params=by_val[1],
        note=f"ray.init {started:.1f} s" + (f", {errors} errored" if errors else ""),
    )


# ---------------------------------------------------------------- the run


def show(s: Search) -> None:
    by_val = f"{s.by_val_test:.4f}" if s.by_val_test is not None else "-"
    print(
        f"{s.label}: {s.trials} trials ({s.succeeded} succeeded, {s.pruned} pruned"
        f"{', ' + s.note if s.note else ''}), {s.steps} steps"
        f"{f' ({s.overshoot} after pruning)' if s.overshoot else ''}, {s.wall:.1f} s; best test "
        f"{s.best_test:.4f} ({brief(s.best_test_params)}); best by validation: test {by_val}"
        f"{' (' + brief(s.by_val_params) + ')' if s.by_val_params else ''}",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="CPU workers (default 2)")
    parser.add_argument("--steps", type=int, help="training steps per trial (default 1500)")
    parser.add_argument(
        "--turnaround-jobs", type=int, help="tiny jobs for the turnaround (default 30; 0 skips)"
    )
    parser.add_argument("--skip-ray", action="store_true", help="no Ray Tune peer")
    parser.add_argument(
        "--turnaround-only", action="store_true", help="only the turnaround, before and after"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 300 steps, 9 points, 5 tiny jobs"
    )
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="per search, seconds")
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 1500)
    jobs = args.turnaround_jobs if args.turnaround_jobs is not None else (5 if args.quick else 30)
    if steps % EVALS or steps < EVALS:
        parser.error(f"--steps must be a multiple of {EVALS} (evaluations every {EVALS}th)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.turnaround_only:
        with tempfile.TemporaryDirectory(prefix="bench-turnaround-") as tmp:
            before, after = turnarounds(Path(tmp), jobs or 30)
        print(turnaround_line(before, after))
        return 0
    if not args.skip_ray:
        try:
            import ray.tune  # noqa: F401  (fail before the long part, not after it)
        except ImportError:
            raise SystemExit(RAY_MISSING) from None
    grid = space(args.quick)
    points = len(list(itertools.product(*grid.values())))
    print(
        f"{points} points x {steps} steps (evaluated every {steps // EVALS}), "
        f"{args.workers} worker(s), {os.cpu_count()} CPU(s)",
        flush=True,
    )

    searches: list[Search] = []
    rates = None
    with tempfile.TemporaryDirectory(prefix="bench-experiments-") as tmp:
        folder = Path(tmp)
        proc, address = serve(folder / "server", args.workers)
        try:
            with TrainingClient(address) as client:
                for label, asha in (("service, full grid", False), ("service, ASHA", True)):
                    name = "bench-asha" if asha else "bench-grid"
                    spec = experiment(name, steps, grid, args.workers, asha)
                    searches.append(service_search(client, label, spec, args.timeout))
                    show(searches[-1])
        finally:
            stop(proc)
        if jobs:
            rates = turnarounds(folder, jobs)
        if not args.skip_ray:
            searches.append(ray_search(grid, steps, args.workers, folder))
            show(searches[-1])

    grid_run, asha_run = searches[0], searches[1]
    print()
    print(
        f"{'run':<22}{'trials':>7}{'done':>6}{'pruned':>7}{'steps':>9}{'wall s':>9}"
        f"{'best test':>11}{'test @ best val':>17}"
    )
    for s in searches:
        by_val = f"{s.by_val_test:.4f}" if s.by_val_test is not None else "-"
        print(
            f"{s.label:<22}{s.trials:>7}{s.succeeded:>6}{s.pruned:>7}{s.steps:>9}{s.wall:>9.1f}"
            f"{s.best_test:>11.4f}{by_val:>17}"
        )
    print()
    if len(searches) > 2:
        ray_run = searches[2]
        print(
            f"Ray Tune ASHA / service ASHA: steps {ray_run.steps / asha_run.steps:.3f}, "
            f"wall {ray_run.wall / asha_run.wall:.3f}, "
            f"best test {100 * (ray_run.best_test - asha_run.best_test):+.2f} points"
        )
    print(f"wall ratio (asha/grid): {asha_run.wall / grid_run.wall:.3f}")
    if rates is not None:
        print(turnaround_line(*rates))
    print(f"steps ratio (asha/grid): {asha_run.steps / grid_run.steps:.3f}")
    print(
        f"accuracy gap (grid - asha): {100 * (grid_run.best_test - asha_run.best_test):.2f} points"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
