"""The experiment controller: runs each experiment's trials as jobs of the queue, with Optuna.

One thread per server. Each tick it takes the running experiments whose lease it holds (or
whose owner's lease ran out: a server that died) and, for each:

- follows its running trials: new evaluations (or windows of step values) go to the pruner as
  they arrive, and a trial the pruner stops is cancelled at once, its device freed; a trial
  whose job ended is told to the study with its objective;
- starts trials while fewer than `max_concurrent_trials` run and the experiment has trials and
  budget left. Optuna's ask-and-tell interface gives each trial's parameters; the trial and its
  job are written in one transaction keyed by the study's trial number, so a controller that
  restarts never starts a trial twice (a trial asked for but not yet written is picked up
  again, with its parameters, instead of asking anew);
- ends it when its last trial has ended, or when it was cancelled.

The study lives in Optuna's RDB storage beside the service's own database (a file next to the
SQLite store, or a schema of the PostgreSQL database), so `optuna-dashboard` shows it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from stepstream.kernel.experiment import Distribution, ExperimentSpec, apply
from stepstream.kernel.states import ExperimentState, JobState, TrialState
from stepstream_service.config import Settings
from stepstream_service.store import Job, NewJob, Store
from stepstream_service.store.database import POSTGRES_CONNECT, engine_url
from stepstream_service.store.errors import ExperimentFinished, JobFinished
from stepstream_service.store.experiments import Experiment, Trial

log = logging.getLogger(__name__)
OPTUNA_SCHEMA = "optuna"  # on PostgreSQL: the study's tables, apart from the service's


def study_storage(settings: Settings, *, hide_password: bool = True) -> str:
    """The Optuna storage URL of the experiments' studies (for optuna-dashboard)."""
    if settings.experiments_storage:
        url = sa.make_url(settings.experiments_storage)
    else:
        store = sa.make_url(engine_url(settings.store_url))
        if store.get_backend_name() == "sqlite":
            folder = os.path.dirname(store.database or "") or "."
            url = store.set(database=os.path.join(folder, "optuna.db"))
        else:
            url = store.update_query_dict({"options": f"-csearch_path={OPTUNA_SCHEMA}"})
    return url.render_as_string(hide_password=hide_password)


def _optuna_distribution(dist: Distribution) -> Any:
    import optuna

    if dist.kind == "choice":
        return optuna.distributions.CategoricalDistribution(dist.optuna_choices())
    if dist.kind == "int":
        return optuna.distributions.IntDistribution(
            int(dist.low), int(dist.high), log=dist.log, step=int(dist.step or 1)
        )
    return optuna.distributions.FloatDistribution(
        float(dist.low), float(dist.high), log=dist.log, step=dist.step
    )


def _sampler(spec: ExperimentSpec) -> Any:
    import optuna

    seed = spec.sampler.seed
    name = spec.sampler.name
    if name == "grid":
        space = {path: d.optuna_choices() if d.kind == "choice" else d.values()
                 for path, d in spec.space.items()}  # fmt: skip
        return optuna.samplers.GridSampler(space, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(spec: ExperimentSpec) -> Any:
    import optuna

    p = spec.pruner
    if p.name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_steps or "auto",
            reduction_factor=p.reduction_factor or 3,
            min_early_stopping_rate=p.min_early_stopping_rate or 0,
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_steps or 1,
            max_resource=p.max_steps or "auto",
            reduction_factor=p.reduction_factor or 3,
        )
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials or 0, n_warmup_steps=p.warmup_steps or 0
        )
    return optuna.pruners.NopPruner()


@dataclass
class _Window:
    """Step values since the last report, for an objective of the stream."""

    values: list[float] = field(default_factory=list)
    last: float | None = None


class Objective:
    """Where a trial's objective comes from: the values reported along the way (evaluations,
    else windows of the step stream) and the final one."""

    def __init__(self, spec: ExperimentSpec):
        metric = spec.objective.metric
        self.metric = metric
        self.final_from = "test" if metric.startswith("test_") else (
            "eval" if metric.startswith("val_") else "stream")  # fmt: skip
        self.name = metric.removeprefix("test_").removeprefix("val_")
        job = spec.job
        self.eval_every = job.training.eval_every
        # Along the way: the evaluations of the same metric when the job evaluates; else the
        # stream's value (loss stays loss; an accuracy-like metric reads the step accuracy).
        self.along_eval = bool(self.eval_every) and self.final_from != "stream"
        self.stream_field = self.name if self.name in ("loss", "accuracy", "mae") else "loss"
        self.report_every = (
            spec.pruner.min_steps or self.eval_every or max(1, (job.training.steps or 1000) // 10)
        )

    def from_eval(self, payload: dict[str, Any]) -> float | None:
        value = payload.get("values", {}).get(self.name)
        return None if value is None else float(value)

    def final(self, job: Job, reported: float | None) -> float | None:
        if self.final_from == "test":
            value = job.test_metrics.get(self.name)
            return None if value is None else float(value)
        if self.final_from == "eval":
            return reported
        return reported if reported is not None else getattr(job, self.stream_field, None)


class Controller:
    """Drives every running experiment this server holds the lease of."""

    def __init__(self, settings: Settings, store: Store, metrics: Any = None):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}-{os.getpid()}-experiments"
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self._storage: Any = None
        self._studies: dict[str, Any] = {}
        self._specs: dict[str, ExperimentSpec] = {}
        self._windows: dict[tuple[str, int], _Window] = {}

    # ------------------------------------------------------------ life

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="experiments", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.store.release_experiments(self.owner)

    def _run(self) -> None:
        while not self.stopping.wait(self.settings.experiment_poll_seconds):
            try:
                self.tick()
            except Exception:
                log.exception("experiments: a tick failed; trying again")

    def tick(self) -> None:
        held = self.store.claim_experiments(self.owner, self.settings.lease_seconds)
        for exp in held:
            if self.stopping.is_set():
                return
            try:
                self.drive(exp)
            except ExperimentFinished:
                pass  # ended meanwhile (cancelled through another server)
            except Exception as exc:
                log.exception("experiment %s: the controller failed", exp.id)
                self._end(exp, ExperimentState.FAILED, f"the controller failed: {exc}")
        self._forget({e.id for e in held})

    # ------------------------------------------------------------ one experiment

    def storage(self) -> Any:
        if self._storage is None:
            import optuna

            url = study_storage(self.settings, hide_password=False)
            options: dict[str, Any] = {}
            if sa.make_url(url).get_backend_name() == "postgresql":
                with self.store.engine.begin() as conn:
                    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {OPTUNA_SCHEMA}")
                options = {"connect_args": dict(POSTGRES_CONNECT), "pool_pre_ping": True}
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._storage = optuna.storages.RDBStorage(engine_url(url), engine_kwargs=options)
        return self._storage

    def study(self, exp: Experiment, spec: ExperimentSpec) -> Any:
        study = self._studies.get(exp.id)
        if study is None:
            import optuna

            study = optuna.create_study(
                storage=self.storage(),
                study_name=exp.id,
                direction=spec.objective.direction,
                sampler=_sampler(spec),
                pruner=_pruner(spec),
                load_if_exists=True,
            )
            self._studies[exp.id] = study
        return study

    def drive(self, exp: Experiment) -> None:
        spec = self._specs.get(exp.id)
        if spec is None:  # checked against the job at every probe: parsed once, not per look
            spec = self._specs[exp.id] = ExperimentSpec.parse(exp.spec)
        study = self.study(exp, spec)
        objective = Objective(spec)
        trials = self.store.trials(exp.id)
        if exp.cancel_requested:
            self._cancel_running(exp, study, trials, "the experiment was cancelled")
            self._end(exp, ExperimentState.CANCELLED, "cancelled")
            return
        for trial in trials:
            if trial.state == TrialState.RUNNING:
                self._follow(exp, spec, study, objective, trial)
        trials = self.store.trials(exp.id)
        out_of_time = (
            spec.budget is not None
            and spec.budget.seconds is not None
            and time.time() - exp.created_at >= spec.budget.seconds
        )
        if out_of_time:
            self._cancel_running(exp, study, trials, "the experiment's time budget ran out")
            trials = self.store.trials(exp.id)
        elif not self._over_step_budget(spec, trials):
            self._launch(exp, spec, study, trials)
            trials = self.store.trials(exp.id)
        self._best(exp, spec, trials)
        self._export(exp, trials)
        if not any(t.state == TrialState.RUNNING for t in trials) and (
            out_of_time
            or len(trials) >= (spec.max_trials or 0)
            or self._over_step_budget(spec, trials)
        ):
            finished = [t for t in trials if t.state in (TrialState.SUCCEEDED, TrialState.PRUNED)]
            if finished:
                self._end(exp, ExperimentState.SUCCEEDED, f"{len(trials)} trials")
            else:
                self._end(exp, ExperimentState.FAILED, "no trial succeeded")

    def _over_step_budget(self, spec: ExperimentSpec, trials: list[Trial]) -> bool:
        if spec.budget is None or spec.budget.steps is None:
            return False
        return self._steps_used(trials) >= spec.budget.steps

    def _steps_used(self, trials: list[Trial]) -> int:
        total = 0
        for t in trials:
            with contextlib.suppress(Exception):
                total += self.store.get_job(t.job_id).step
        return total

    # ------------------------------------------------------------ trials

    def _launch(self, exp: Experiment, spec: ExperimentSpec, study: Any, trials: list[Trial]):
        import optuna

        running = sum(t.state == TrialState.RUNNING for t in trials)
        known = {t.number for t in trials}
        limit = spec.max_trials or 0
        distributions = {path: _optuna_distribution(d) for path, d in spec.space.items()}
        # Asked for before a crash and never written: these go first, with their parameters.
        orphans = [
            t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.number not in known
        ]  # fmt: skip
        while running < spec.max_concurrent_trials and len(known) < limit:
            if orphans:
                frozen = orphans.pop(0)
                number, sampled = frozen.number, dict(frozen.params)
                if set(sampled) != set(distributions):
                    _tell(study, number, state=optuna.trial.TrialState.FAIL)
                    continue
            else:
                if self._grid_done(spec, study):
                    return
                asked = study.ask(distributions)
                number, sampled = asked.number, dict(asked.params)
            params = {path: spec.space[path].decode(v) for path, v in sampled.items()}
            job_spec = apply(spec.job, params)
            priority = spec.trial_priority if spec.trial_priority is not None else exp.priority
            labels = {**job_spec.labels, "experiment": exp.id, "trial": str(number)}
            new = NewJob(
                name=f"{exp.name}-{number}",
                spec={**job_spec.to_dict(), "labels": labels},
                spec_hash=f"{exp.id}/{number}",
                labels=labels,
                priority=priority,
                max_attempts=self.settings.max_attempts,
                total_steps=job_spec.training.steps or 0,
                needs="gpu" if job_spec.runtime.device == "gpu" else "any",
                devices=job_spec.runtime.devices,
                tenant=exp.tenant,
            )
            _, job = self.store.add_trial(exp.id, number, params, new)
            known.add(number)
            running += 1
            log.info(
                "experiment %s: trial %d is job %s (%s)", exp.id, number, job.id, _brief(params)
            )

    def _grid_done(self, spec: ExperimentSpec, study: Any) -> bool:
        # A grid sampler asked past its last point repeats one: stop at the grid's size.
        size = spec.grid_size() if spec.sampler.name == "grid" else None
        return size is not None and len(study.get_trials(deepcopy=False)) >= size

    def _follow(self, exp, spec, study, objective: Objective, trial: Trial) -> None:
        job = self.store.get_job(trial.job_id)
        events = self.store.read_events(job.id, after_seq=trial.seen_seq, limit=5000)
        reported, step = trial.value, trial.step
        window = self._windows.setdefault((exp.id, trial.number), _Window())
        seen = trial.seen_seq
        pruned_at: int | None = None
        for event in events:
            seen = event.seq
            value = None
            if event.kind == "eval" and objective.along_eval:
                value = objective.from_eval(event.payload)
                at = int(event.payload["step"])
            elif event.kind == "step" and not objective.along_eval:
                got = event.payload.get(objective.stream_field)
                if got is None or not math.isfinite(got):
                    continue
                window.values.append(float(got))
                at = int(event.payload["step"])
                if at % objective.report_every != 0:
                    continue
                value = sum(window.values) / len(window.values)
                window.values.clear()
            if value is None or not math.isfinite(value):
                continue
            reported, step = value, at
            if self._report(study, trial.number, value, at):
                pruned_at = at
                break
        if pruned_at is not None:
            self._prune(exp, spec, study, trial, job, reported, pruned_at, seen)
            return
        if (reported, step) != (trial.value, trial.step) or seen != trial.seen_seq:
            self.store.update_trial(exp.id, trial.number, value=reported, step=step,
                                    seen_seq=seen)  # fmt: skip
        if job.terminal and len(events) < 5000:
            self._finished(exp, study, objective, trial, job, reported)

    def _report(self, study: Any, number: int, value: float, step: int) -> bool:
        """Report to the study; whether its pruner stops the trial here."""
        import optuna

        trial = optuna.trial.Trial(study, self._trial_id(study, number))
        with contextlib.suppress(RuntimeError):  # a step reported before: Optuna warns, keeps it
            trial.report(value, step)
        return trial.should_prune()

    def _trial_id(self, study: Any, number: int) -> int:
        return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)

    def _prune(self, exp, spec, study, trial: Trial, job: Job, value, step: int, seen: int):
        import optuna

        reason = (
            f"pruned at step {step} by {spec.pruner.name}: {spec.objective.metric} "
            f"{value:.4g} fell behind"
        )
        with contextlib.suppress(JobFinished):
            self.store.cancel(job.id)
        self.store.update_trial(exp.id, trial.number, state=TrialState.PRUNED, value=value,
                                step=step, reason=reason, seen_seq=seen)  # fmt: skip
        _tell(study, trial.number, state=optuna.trial.TrialState.PRUNED)
        self._windows.pop((exp.id, trial.number), None)
        log.info("experiment %s: trial %d (job %s) %s", exp.id, trial.number, job.id, reason)

    def _finished(self, exp, study, objective: Objective, trial: Trial, job: Job, reported):
        import optuna

        if job.state == JobState.SUCCEEDED:
            value = objective.final(job, reported)
            if value is not None and math.isfinite(value):
                _tell(study, trial.number, value)
                self.store.update_trial(exp.id, trial.number, state=TrialState.SUCCEEDED,
                                        value=value, step=job.step)  # fmt: skip
            else:
                reason = f"the job succeeded without a value of {objective.metric}"
                _tell(study, trial.number, state=optuna.trial.TrialState.FAIL)  # fmt: skip
                self.store.update_trial(exp.id, trial.number, state=TrialState.FAILED,
                                        reason=reason)  # fmt: skip
        else:
            failure = job.failure
            reason = failure.message if failure else f"its job was {job.state.value.lower()}"
            state = TrialState.FAILED if job.state == JobState.FAILED else TrialState.CANCELLED
            _tell(study, trial.number, state=optuna.trial.TrialState.FAIL)
            self.store.update_trial(exp.id, trial.number, state=state, reason=reason)
        self._windows.pop((exp.id, trial.number), None)
        log.info("experiment %s: trial %d (job %s) ended %s", exp.id, trial.number, job.id,
                 job.state.value)  # fmt: skip

    def _cancel_running(self, exp, study, trials: list[Trial], reason: str) -> None:
        import optuna

        for trial in trials:
            if trial.state != TrialState.RUNNING:
                continue
            with contextlib.suppress(JobFinished):
                self.store.cancel(trial.job_id)
            self.store.update_trial(exp.id, trial.number, state=TrialState.CANCELLED,
                                    reason=reason)  # fmt: skip
            _tell(study, trial.number, state=optuna.trial.TrialState.FAIL)

    # ------------------------------------------------------------ the experiment

    def _best(self, exp: Experiment, spec: ExperimentSpec, trials: list[Trial]) -> None:
        done = [t for t in trials if t.state == TrialState.SUCCEEDED and t.value is not None]
        if not done:
            return
        pick = max if spec.objective.mode == "max" else min
        best = pick(done, key=lambda t: t.value)
        if (best.number, best.value) != (exp.best_trial, exp.best_value):
            self.store.update_experiment(exp.id, best_trial=best.number, best_value=best.value)

    def _end(self, exp: Experiment, state: ExperimentState, message: str) -> None:
        with contextlib.suppress(ExperimentFinished):
            self.store.update_experiment(exp.id, state=state, message=message)
            log.info("experiment %s: %s (%s)", exp.id, state.value, message)
        self._studies.pop(exp.id, None)
        self._specs.pop(exp.id, None)
        if self.metrics is not None:  # the series are of running experiments only
            for s in TrialState:
                with contextlib.suppress(KeyError):
                    self.metrics.experiment_trials.remove(exp.id, s.value)
            with contextlib.suppress(KeyError):
                self.metrics.experiment_best.remove(exp.id)

    def _export(self, exp: Experiment, trials: list[Trial]) -> None:
        if self.metrics is None:
            return
        counts = {s: 0 for s in TrialState}
        for t in trials:
            counts[t.state] += 1
        for state, n in counts.items():
            self.metrics.experiment_trials.labels(exp.id, state.value).set(n)
        best = self.store.get_experiment(exp.id).best_value
        if best is not None:
            self.metrics.experiment_best.labels(exp.id).set(best)

    def _forget(self, held: set[str]) -> None:
        for exp_id in (set(self._studies) | set(self._specs)) - held:
            self._studies.pop(exp_id, None)
            self._specs.pop(exp_id, None)
        for key in [k for k in self._windows if k[0] not in held]:
            self._windows.pop(key, None)


def _tell(study: Any, *args: Any, **kwargs: Any) -> None:
    """study.tell, where a grid sampler's "the grid is done" (Study.stop, meant for
    study.optimize) is no error: Optuna has stored the trial's end by then."""
    try:
        study.tell(*args, skip_if_finished=True, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def _brief(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())
