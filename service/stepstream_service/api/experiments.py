"""The experiment RPCs: an experiment spec validated into the store, its rows as protobuf, and
the WatchExperiment stream, which polls the experiment's seq.

The servicer delegates here (`TrainerServicer.CreateExperiment` ...) and lends its auth, limits,
checks and watcher slots, so an experiment is held to what a job is held to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from stepstream.kernel.experiment import ExperimentSpec, apply
from stepstream.kernel.spec import JobSpec, SpecError, SpecLimits
from stepstream.kernel.states import ExperimentState, TrialState
from stepstream.kernel.wire import experiment_state_to_proto, timestamp, trial_state_to_proto
from stepstream.v1 import trainer_pb2 as pb
from stepstream_service.api.convert import json_of
from stepstream_service.api.errors import InvalidArgument, violations
from stepstream_service.store import Experiment, NewExperiment, Trial

if TYPE_CHECKING:
    from stepstream_service.api.servicer import TrainerServicer

log = logging.getLogger(__name__)

_NAME = re.compile(r"(?:experiments/)?(exp-[0-9a-f]{1,40})")
_FILTER_TERM = re.compile(r"^(state|name)=([^\s\x00]+)$")
MAX_FILTER_CHARS = 2048
WATCH_POLL = 0.2  # seconds between a watcher's looks at the experiment's seq
LIST_CHUNK = 20  # experiments read from the store at a time while a page is built
# Experiments a ListExperiments call looks at, at most: a filter that matches few answers a
# short page and a token rather than reading every experiment in one call.
LIST_SCAN = 1000
MAX_PRIORITY = 1000
# Bytes of a trial's answer besides its params: names, numbers, times, a reason.
TRIAL_SLACK = 512


def experiment_id_of(name: str, field: str = "name") -> str:
    """The id in an experiment's resource name (or the bare id)."""
    match = _NAME.fullmatch(name)
    if not match:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidArgument(
            field, f"{shown!r} is no experiment name; they look like experiments/exp-1a2b..."
        )
    return match.group(1)


def experiment_of(text: str, limits: SpecLimits, max_bytes: int | None = None) -> ExperimentSpec:
    """The validated experiment in a request's spec_json: every problem at once, or SpecError."""
    required = "the experiment spec as JSON text, its job inline"
    return ExperimentSpec.parse(json_of(text, required, max_bytes), limits=limits)


def parse_experiment_filter(text: str) -> tuple[set[ExperimentState], str | None]:
    """(the states asked for, none meaning any; the display name asked for, or None)."""
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidArgument("filter", f"at most {MAX_FILTER_CHARS} characters, not {len(text)}")
    states: set[ExperimentState] = set()
    name = None
    for term in text.replace(" AND ", " ").split():
        match = _FILTER_TERM.match(term)
        if not match:
            shown = term if len(term) <= 80 else term[:80] + "..."
            raise InvalidArgument("filter", f"cannot read {shown!r}; use state=RUNNING, name=NAME")
        key, value = match.groups()
        if key == "name":
            name = value
            continue
        try:
            states.add(ExperimentState(value.upper().removeprefix("EXPERIMENT_STATE_")))
        except ValueError:
            valid = ", ".join(s.value for s in ExperimentState)
            raise InvalidArgument("filter", f"unknown state {value!r}; valid: {valid}") from None
    return states, name


def trial_to_proto(trial: Trial) -> pb.Trial:
    return pb.Trial(
        number=trial.number,
        job=f"jobs/{trial.job_id}",
        state=trial_state_to_proto(trial.state),
        params_json=json.dumps(trial.params, sort_keys=True),
        value=trial.value if trial.value is not None and math.isfinite(trial.value) else None,
        step=trial.step,
        reason=trial.reason or "",
        seq=trial.seq,
        create_time=timestamp(trial.created_at),
        end_time=timestamp(trial.finished_at),
    )


def experiment_to_proto(
    exp: Experiment,
    *,
    counts: dict[str, int],
    trials: Sequence[Trial] = (),
    study_storage: str = "",
) -> pb.Experiment:
    objective = exp.spec.get("objective") or {}
    if not isinstance(objective, dict):
        objective = {"metric": str(objective)}
    best = exp.best_value if exp.best_value is not None and math.isfinite(exp.best_value) else None
    return pb.Experiment(
        name=f"experiments/{exp.id}",
        display_name=exp.name,
        state=experiment_state_to_proto(exp.state),
        spec_json=json.dumps(exp.spec),
        create_time=timestamp(exp.created_at),
        end_time=timestamp(exp.finished_at),
        trials=[trial_to_proto(t) for t in trials],
        best_trial=exp.best_trial,
        best_value=best,
        objective=str(objective.get("metric", "")),
        direction="maximize" if objective.get("mode") == "max" else "minimize",
        max_trials=int(exp.spec.get("max_trials") or 0),
        message=exp.message or "",
        last_seq=exp.last_seq,
        study_storage=study_storage,
        trial_counts=counts,
        cancel_requested=exp.cancel_requested,
        priority=exp.priority,
        request_id=exp.request_id or "",
    )


def counts_of(states: Any) -> dict[str, int]:
    """Trials per state name, from their states."""
    return {TrialState(s).value: n for s, n in Counter(states).items()}


def spec_hash(spec: ExperimentSpec, priority: int) -> str:
    body = json.dumps([spec.to_dict(), priority], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def answer_bytes(spec: ExperimentSpec, request_id: str) -> int:
    """About how large GetExperiment's answer grows: the spec, and every trial it may run with
    the longest values its space can give them."""
    head = pb.Experiment(
        display_name=spec.name, spec_json=json.dumps(spec.to_dict()), request_id=request_id
    ).ByteSize()
    params = 2 + sum(
        len(path) + 4 + max(len(json.dumps(v)) for _, v in dist.probes())
        for path, dist in spec.space.items()
    )
    return head + (spec.max_trials or 0) * (params + TRIAL_SLACK)


class ExperimentRpcs:
    """CreateExperiment, GetExperiment, ListExperiments, CancelExperiment, WatchExperiment."""

    def __init__(self, api: TrainerServicer):
        self.api = api
        self.store = api.store
        self._storage: str | None = None

    def study_storage(self) -> str:
        """Where the controller keeps its Optuna studies, for optuna-dashboard; "" on a server
        without the controller."""
        if self._storage is None:
            try:
                from stepstream_service.runtime.experiments import study_storage
            except ImportError:
                return ""
            self._storage = study_storage(self.api.settings)
        return self._storage

    def _answer(self, exp: Experiment, with_trials: bool = True) -> pb.Experiment:
        trials = self.store.trials(exp.id)
        return experiment_to_proto(
            exp,
            counts=counts_of(t.state for t in trials),
            trials=trials if with_trials else [],
            study_storage=self.study_storage(),
        )

    # ------------------------------------------------------------ create

    def create(self, request: pb.CreateExperimentRequest, context: Any) -> pb.Experiment:
        api = self.api
        api._check_open()
        tenant = api.auth.tenant_of(context)
        bad: list[tuple[str, str]] = []
        refused: SpecError | InvalidArgument | None = None
        try:
            spec = experiment_of(request.spec_json, api.limits, api.settings.max_spec_bytes)
        except (SpecError, InvalidArgument) as exc:
            spec, refused = None, exc
        if spec is not None:
            for where, label, job in self._jobs_of(spec):
                for field, why in api._foreign_paths(job, tenant):
                    bad.append(_placed(where, label, field, why))
            priority = spec.trial_priority
            if priority is not None and not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
                bad.append(("spec.trial_priority", f"must be between -1000 and {MAX_PRIORITY}"))
        if request.priority and not -MAX_PRIORITY <= request.priority <= MAX_PRIORITY:
            bad.append(("priority", f"must be between -1000 and {MAX_PRIORITY}"))
        if len(request.request_id) > 128 or not request.request_id.isprintable():
            bad.append(("request_id", "at most 128 printable characters (no NUL or newline)"))
        if refused is not None:
            if not bad:
                raise refused  # the spec alone is wrong: its own error, every problem listed
            bad = violations(refused) + bad
        if bad:
            raise InvalidArgument.each(bad)
        assert spec is not None
        self._check_uploads(spec, tenant)
        api._check_storage(tenant)
        api._check_fits(spec.job)
        api._check_fork(spec.job, tenant)  # every trial starts from that job's checkpoint
        size, limit = answer_bytes(spec, request.request_id), api.settings.max_message_bytes
        if size > limit:
            raise InvalidArgument(
                "spec_json",
                f"the experiment's answer, with its {spec.max_trials} trials, would be about "
                f"{size} bytes, over this server's limit of {limit} (max_message_bytes); "
                "run fewer trials",
            )
        priority = spec.trial_priority if spec.trial_priority is not None else request.priority
        new = NewExperiment(
            name=spec.name,
            spec=spec.to_dict(),
            spec_hash=spec_hash(spec, priority),
            priority=priority,
            request_id=request.request_id or None,
            tenant=tenant or "",
        )
        exp, created = self.store.create_experiment(new)
        if created:
            log.info("experiment %s: created (%s, %s trials)", exp.id, spec.name, spec.max_trials)
        return self._answer(exp)

    def _jobs_of(self, spec: ExperimentSpec) -> Iterator[tuple[str, str, JobSpec]]:
        """(where, what, job) of each job whose uploads are checked: the base job, and the job
        each choice makes that is not a number (only those can name a file)."""
        yield "spec.job", "", spec.job
        for path, dist in spec.space.items():
            if dist.kind != "choice":
                continue
            for label, value in dist.probes():
                if isinstance(value, (int, float, bool)) or value is None:
                    continue
                yield f"spec.space.{path}", label, apply(spec.job, {path: value}, self.api.limits)

    def _check_uploads(self, spec: ExperimentSpec, tenant: str | None) -> None:
        """Every file a trial may read, and every backbone's weights, are the tenant's uploads
        there now (as CreateJob holds a job's), each refused one named."""
        bad: list[tuple[str, str]] = []
        for where, label, job in self._jobs_of(spec):
            for check in (self.api._check_dataset, self.api._check_weights):
                try:
                    check(job, tenant)
                except InvalidArgument as exc:
                    field = exc.field.removeprefix("spec.")
                    bad.append(_placed(where, label, field, exc.description))
        if bad:
            raise InvalidArgument.each(bad)

    # ------------------------------------------------------------ get, list, cancel

    def get(self, request: pb.GetExperimentRequest, context: Any) -> pb.Experiment:
        tenant = self.api.auth.tenant_of(context)
        exp = self.store.get_experiment(experiment_id_of(request.name), tenant)
        return self._answer(exp)

    def cancel(self, request: pb.CancelExperimentRequest, context: Any) -> pb.Experiment:
        tenant = self.api.auth.tenant_of(context)  # before the name: a stranger learns nothing
        exp = self.store.request_experiment_cancel(experiment_id_of(request.name), tenant)
        log.info("experiment %s: cancel requested", exp.id)
        return self._answer(exp)

    def list(self, request: pb.ListExperimentsRequest, context: Any) -> pb.ListExperimentsResponse:
        tenant = self.api.auth.tenant_of(context)
        states, name = parse_experiment_filter(request.filter)
        size = request.page_size or 50
        if not 0 < size <= 1000:
            raise InvalidArgument("page_size", "must be between 1 and 1000")
        after = _token_position(request.page_token)
        page: list[pb.Experiment] = []
        budget, scanned, full = self.api._page_bytes(), 0, False
        while not full:
            rows, more = self._after(tenant, after)
            for i, exp in enumerate(rows):
                if (not states or exp.state in states) and (not name or exp.name == name):
                    message = self._answer(exp, with_trials=False)
                    budget -= message.ByteSize()
                    if page and budget < 0:
                        full = more = True  # full by size: this one comes next
                        break
                    page.append(message)
                after, scanned = (exp.created_at, exp.id), scanned + 1
                if len(page) == size or scanned >= LIST_SCAN:
                    full, more = True, more or i < len(rows) - 1
                    break
            full = full or not more
        token = ""
        if more and after is not None:
            token = base64.urlsafe_b64encode(f"{after[0]!r}|{after[1]}".encode()).decode()
        return pb.ListExperimentsResponse(experiments=page, next_page_token=token)

    def _after(
        self, tenant: str | None, after: tuple[float, str] | None
    ) -> tuple[list[Experiment], bool]:
        """(the next experiments after `after`, newest first; whether there may be more). The
        store pages by creation time alone, so those created at the same instant as `after`
        are read again and the ones already listed dropped."""
        before = None if after is None else math.nextafter(after[0], math.inf)
        limit = LIST_CHUNK
        while True:
            found = self.store.list_experiments(tenant=tenant, limit=limit, before=before)
            rows = [e for e in found if after is None or (e.created_at, e.id) < after]
            if rows or len(found) < limit:
                return rows, len(found) == limit
            limit *= 2  # a chunk of ties all listed already: read past them

    # ------------------------------------------------------------ watch

    def watch(self, request: pb.WatchExperimentRequest, context: Any) -> Iterator[Any]:
        api = self.api
        tenant = api.auth.tenant_of(context)
        exp = self.store.get_experiment(experiment_id_of(request.name), tenant)
        release = api._take_watcher_slot(tenant)
        context.add_callback(release)
        try:
            yield from self._watch(exp, max(request.after_seq, 0), context)
        finally:
            release()

    def _watch(
        self, exp: Experiment, cursor: int, context: Any
    ) -> Iterator[pb.WatchExperimentResponse]:
        # The experiment is read before its trials, every time: a trial stamped after the
        # experiment was read is sent now and again with the next change at most, and every
        # change to the experiment itself is at or below the cursor this message ends at.
        trials = self.store.trials(exp.id)
        states = {t.number: t.state for t in trials}
        changed = [t for t in trials if t.seq > cursor]
        ended = threading.Event()
        context.add_callback(ended.set)  # an ended stream's thread stops waiting at once
        while True:
            cursor = max([cursor, exp.last_seq, *(t.seq for t in changed)])
            message = experiment_to_proto(
                exp, counts=counts_of(states.values()), study_storage=self.study_storage()
            )
            yield pb.WatchExperimentResponse(
                experiment=message, trials=[trial_to_proto(t) for t in changed], seq=cursor
            )
            if exp.terminal:
                return
            while True:
                if ended.wait(WATCH_POLL) or not context.is_active():
                    return
                exp = self.store.get_experiment(exp.id)
                if exp.last_seq > cursor:
                    break
            changed = self.store.trials(exp.id, after_seq=cursor)
            states.update((t.number, t.state) for t in changed)


def _placed(where: str, label: str, field: str, why: str) -> tuple[str, str]:
    """A base job's problem at spec.job.<field>; a choice's at its space path, saying which."""
    if where == "spec.job":
        return f"spec.job.{field}", why
    return where, f"{label}: {field} {why}"


def _token_position(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    if len(token) > 512:
        raise InvalidArgument("page_token", "not a token this server gave out")
    try:
        created, exp_id = base64.urlsafe_b64decode(token).decode().split("|")
        if not _NAME.fullmatch(exp_id):
            raise ValueError(exp_id)
        position = (float(created), exp_id)
        if not math.isfinite(position[0]):
            raise ValueError(created)
    except ValueError:
        raise InvalidArgument("page_token", "not a token this server gave out") from None
    return position
