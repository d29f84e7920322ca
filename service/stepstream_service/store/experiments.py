"""Experiments and their trials: the rows a controller drives and WatchExperiment reads.

A trial is created with its job in one transaction, keyed by the study's trial number, so a
controller that restarts finds every trial it started and never starts one twice. Every change
to an experiment or its trials raises the experiment's `last_seq` and stamps the trial with it:
a watcher resumes with "everything after seq N".
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from stepstream.kernel.states import ExperimentState, TrialState
from stepstream_service.store.errors import AlreadyExists, ExperimentFinished, ExperimentNotFound
from stepstream_service.store.jobs import Job, Jobs, NewJob
from stepstream_service.store.schema import experiments, trials


@dataclass
class Experiment:
    id: str
    name: str
    tenant: str
    spec: dict[str, Any]
    spec_hash: str
    request_id: str | None
    priority: int
    state: ExperimentState
    cancel_requested: bool
    created_at: float
    finished_at: float | None
    owner: str | None
    owner_expires_at: float | None
    best_trial: int | None
    best_value: float | None
    message: str | None
    last_seq: int

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    @classmethod
    def from_row(cls, row: Any) -> Experiment:
        d = dict(row._mapping)
        d["spec"] = json.loads(d["spec"])
        d["state"] = ExperimentState(d["state"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


@dataclass
class Trial:
    experiment_id: str
    number: int
    job_id: str
    params: dict[str, Any]
    state: TrialState
    value: float | None
    step: int
    reason: str | None
    seen_seq: int
    seq: int
    created_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> Trial:
        d = dict(row._mapping)
        d["params"] = json.loads(d["params"])
        d["state"] = TrialState(d["state"])
        return cls(**d)


@dataclass(frozen=True)
class NewExperiment:
    name: str
    spec: dict[str, Any]
    spec_hash: str = ""
    priority: int = 0
    request_id: str | None = None
    tenant: str = ""


def new_experiment_id() -> str:
    return f"exp-{uuid.uuid4().hex[:20]}"


class Experiments(Jobs):
    """The experiments and trials tables."""

    def create_experiment(self, new: NewExperiment) -> tuple[Experiment, bool]:
        """(experiment, created); a repeated request_id answers with the first one, as jobs do."""
        with self.engine.begin() as conn:
            if new.request_id:
                row = conn.execute(
                    sa.select(experiments).where(
                        (experiments.c.tenant == new.tenant)
                        & (experiments.c.request_id == new.request_id)
                    )
                ).first()
                if row is not None:
                    existing = Experiment.from_row(row)
                    if existing.spec_hash != new.spec_hash:
                        raise AlreadyExists(
                            f"request_id {new.request_id!r} was used for experiment "
                            f"{existing.id} with a different spec"
                        )
                    return existing, False
            exp_id = new_experiment_id()
            conn.execute(
                experiments.insert().values(
                    id=exp_id,
                    name=new.name,
                    tenant=new.tenant,
                    spec=json.dumps(new.spec, sort_keys=True),
                    spec_hash=new.spec_hash,
                    request_id=new.request_id or None,
                    priority=new.priority,
                    state=ExperimentState.RUNNING.value,
                    cancel_requested=False,
                    created_at=time.time(),
                    last_seq=1,
                )
            )
            return self._experiment(conn, exp_id), True

    def get_experiment(self, exp_id: str, tenant: str | None = None) -> Experiment:
        with self.reader.connect() as conn:
            return self._experiment(conn, exp_id, tenant=tenant)

    def _experiment(
        self, conn: sa.Connection, exp_id: str, *, tenant: str | None = None, lock: bool = False
    ) -> Experiment:
        query = sa.select(experiments).where(experiments.c.id == exp_id)
        if tenant is not None:
            query = query.where(experiments.c.tenant == tenant)
        if lock and self.postgres:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise ExperimentNotFound(f"experiment {exp_id} not found")
        return Experiment.from_row(row)

    def list_experiments(
        self, *, tenant: str | None = None, limit: int = 100, before: float | None = None
    ) -> list[Experiment]:
        """Newest first; `before` (a created_at) pages on."""
        query = sa.select(experiments).order_by(
            experiments.c.created_at.desc(), experiments.c.id.desc()
        )
        if tenant is not None:
            query = query.where(experiments.c.tenant == tenant)
        if before is not None:
            query = query.where(experiments.c.created_at < before)
        with self.reader.connect() as conn:
            return [Experiment.from_row(r) for r in conn.execute(query.limit(limit))]

    def request_experiment_cancel(self, exp_id: str, tenant: str | None = None) -> Experiment:
        """Marks it; its controller cancels the running trials and ends it."""
        with self.engine.begin() as conn:
            exp = self._experiment(conn, exp_id, tenant=tenant, lock=True)
            if exp.terminal:
                raise ExperimentFinished(f"experiment {exp_id} already {exp.state.value.lower()}")
            conn.execute(
                experiments.update()
                .where(experiments.c.id == exp_id)
                .values(cancel_requested=True, last_seq=experiments.c.last_seq + 1)
            )
            return self._experiment(conn, exp_id)

    def claim_experiments(self, owner: str, lease_seconds: float) -> list[Experiment]:
        """The running experiments this owner drives now: its own, and any whose owner's lease
        ran out (a server that died); their leases are renewed."""
        now = time.time()
        running = sa.select(experiments).where(experiments.c.state == ExperimentState.RUNNING.value)
        # Read first: a controller looks several times a second, and a write transaction each
        # time would contend with the workers' event writes for nothing. Write only to take a
        # free experiment or to renew a lease past half its life.
        with self.reader.connect() as conn:
            seen = [Experiment.from_row(r) for r in conn.execute(running)]
        renew_by = now + lease_seconds / 2
        if not any(
            e.owner is None
            or (e.owner_expires_at or 0) < now
            or (e.owner == owner and (e.owner_expires_at or 0) < renew_by)
            for e in seen
        ):
            return [e for e in seen if e.owner == owner]
        free = (
            (experiments.c.owner == owner)
            | experiments.c.owner.is_(None)
            | (experiments.c.owner_expires_at < now)
        )
        with self.engine.begin() as conn:
            conn.execute(
                experiments.update()
                .where((experiments.c.state == ExperimentState.RUNNING.value) & free)
                .values(owner=owner, owner_expires_at=now + lease_seconds)
            )
            rows = conn.execute(
                sa.select(experiments).where(
                    (experiments.c.state == ExperimentState.RUNNING.value)
                    & (experiments.c.owner == owner)
                )
            )
            return [Experiment.from_row(r) for r in rows]

    def release_experiments(self, owner: str) -> None:
        """A server stopping lets another take its experiments at once."""
        with self.engine.begin() as conn:
            conn.execute(
                experiments.update()
                .where(experiments.c.owner == owner)
                .values(owner=None, owner_expires_at=None)
            )

    def add_trial(
        self, exp_id: str, number: int, params: dict[str, Any], job: NewJob
    ) -> tuple[Trial, Job]:
        """The trial and its queued job, together; a number already used returns its trial."""
        with self.engine.begin() as conn:
            self._experiment(conn, exp_id, lock=True)  # one controller at a time
            row = conn.execute(
                sa.select(trials).where(
                    (trials.c.experiment_id == exp_id) & (trials.c.number == number)
                )
            ).first()
            if row is not None:
                trial = Trial.from_row(row)
                return trial, self._get(conn, trial.job_id)
            now = time.time()
            created = self._insert_job(conn, job, now)
            seq = self._bump(conn, exp_id)
            conn.execute(
                trials.insert().values(
                    experiment_id=exp_id,
                    number=number,
                    job_id=created.id,
                    params=json.dumps(params, sort_keys=True),
                    state=TrialState.RUNNING.value,
                    step=0,
                    seen_seq=0,
                    seq=seq,
                    created_at=now,
                )
            )
            return self._trial(conn, exp_id, number), created

    def trials(self, exp_id: str, *, after_seq: int = 0) -> list[Trial]:
        """By number; with `after_seq`, only those changed since."""
        query = (
            sa.select(trials)
            .where((trials.c.experiment_id == exp_id) & (trials.c.seq > after_seq))
            .order_by(trials.c.number)
        )
        with self.reader.connect() as conn:
            return [Trial.from_row(r) for r in conn.execute(query)]

    def _trial(self, conn: sa.Connection, exp_id: str, number: int) -> Trial:
        row = conn.execute(
            sa.select(trials).where(
                (trials.c.experiment_id == exp_id) & (trials.c.number == number)
            )
        ).one()
        return Trial.from_row(row)

    def update_trial(self, exp_id: str, number: int, **values: Any) -> Trial:
        """Change a trial (state, value, step, reason, seen_seq); a final state is kept."""
        if "state" in values:
            state = TrialState(values["state"])
            values["state"] = state.value
            if state.terminal:
                values.setdefault("finished_at", time.time())
        with self.engine.begin() as conn:
            current = self._trial(conn, exp_id, number)
            if current.state.terminal and "state" in values:
                values.pop("state")
                values.pop("finished_at", None)
            visible = set(values) - {"seen_seq"}
            if visible:
                values["seq"] = self._bump(conn, exp_id)
            if values:
                conn.execute(
                    trials.update()
                    .where((trials.c.experiment_id == exp_id) & (trials.c.number == number))
                    .values(**values)
                )
            return self._trial(conn, exp_id, number)

    def update_experiment(self, exp_id: str, **values: Any) -> Experiment:
        """Change an experiment (best_trial, best_value, message; state ends it, stamped)."""
        if "state" in values:
            state = ExperimentState(values["state"])
            values["state"] = state.value
            if state.terminal:
                values.setdefault("finished_at", time.time())
                values.update(owner=None, owner_expires_at=None)
        with self.engine.begin() as conn:
            current = self._experiment(conn, exp_id, lock=True)
            if current.terminal:
                raise ExperimentFinished(
                    f"experiment {exp_id} already {current.state.value.lower()}"
                )
            conn.execute(
                experiments.update()
                .where(experiments.c.id == exp_id)
                .values(**values, last_seq=experiments.c.last_seq + 1)
            )
            return self._experiment(conn, exp_id)

    def _bump(self, conn: sa.Connection, exp_id: str) -> int:
        conn.execute(
            experiments.update()
            .where(experiments.c.id == exp_id)
            .values(last_seq=experiments.c.last_seq + 1)
        )
        return conn.execute(
            sa.select(experiments.c.last_seq).where(experiments.c.id == exp_id)
        ).scalar_one()
