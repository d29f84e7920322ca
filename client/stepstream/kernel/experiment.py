"""An experiment: a search over a base job's fields, validated like a job spec.

Each trial is the base job with the sampled values set at their dotted paths (`apply`), so a
search space is checked against the job itself: every path must name a field the job has, and
the ends of every range (and every choice) must make a job that `JobSpec` accepts. Samplers
and pruners are named here only; the service maps them (and the distributions) to its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stepstream.kernel import names
from stepstream.kernel.schema import job_spec_schema
from stepstream.kernel.spec import (
    _JOB_NAME,
    JobSpec,
    Problem,
    SpecError,
    SpecLimits,
    _conflict,
    _problems,
    _shown,
    _Spec,
    load_spec,
    parse_duration,
)

MAX_DIMENSIONS = 64
MAX_CHOICES = 1000
MAX_TRIALS = 10_000
INT32 = 2**31

SAMPLERS = ("cmaes", "grid", "random", "tpe")
SAMPLER_ALIASES = {"cma": "cmaes", "cma_es": "cmaes"}
PRUNERS = ("asha", "hyperband", "median", "none")
PRUNER_ALIASES = {"successive_halving": "asha"}
# The options each pruner takes; the rest of PrunerSpec's fields belong to the others.
PRUNER_OPTIONS: dict[str, frozenset[str]] = {
    "asha": frozenset({"min_steps", "reduction_factor", "min_early_stopping_rate"}),
    "hyperband": frozenset({"min_steps", "max_steps", "reduction_factor"}),
    "median": frozenset({"warmup_steps", "startup_trials"}),
    "none": frozenset(),
}
# Distribution keys: canonical kind, and whether the key itself asks for a log scale.
_KINDS = {
    "choice": ("choice", False),
    "categorical": ("choice", False),
    "float": ("float", False),
    "uniform": ("float", False),
    "loguniform": ("float", True),
    "log_uniform": ("float", True),
    "int": ("int", False),
    "integer": ("int", False),
}
# Metrics whose larger values are better, as the trainer's early stopping reads them.
_MAXIMISED = ("accuracy", "auc", "precision", "recall", "r2_score", "cosine_similarity")
_PATH_PART = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class ExperimentError(SpecError):
    """An experiment that cannot run; `problems` names each offending field."""

    def __init__(self, problems: list[Problem]):
        super().__init__(problems)
        lines = "\n".join(f"  {p.field}: {p.message}" for p in problems)
        self.args = (f"invalid experiment spec ({len(problems)} problem(s)):\n{lines}",)


def _canonical(kind: str, value: Any, valid: tuple[str, ...], aliases: dict[str, str]) -> str:
    key = str(value).strip().lower().replace("-", "_")
    key = aliases.get(key, key)
    if key in valid:
        return key
    listed = ", ".join(sorted({*valid, *aliases}))
    raise _conflict("", f"unknown {kind} {_shown(value)!r}; valid {kind} names: {listed}")


def _number(value: Any, kind: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _conflict("", f"{kind} takes numbers; got {_shown(value)!r}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise _conflict("", f"int takes whole numbers; got {value!r}")
        return int(value)
    return float(value)


def _json_key(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        raise _conflict(
            "",
            f"choice values are JSON (numbers, strings, lists, mappings, true, false, null); "
            f"got {_shown(value)!r}",
        ) from None


# ---------------------------------------------------------------- distributions


class Distribution(_Spec):
    """One field's values: `{choice: [...]}`, `{float: [low, high]}` (`uniform`,
    `loguniform`), or `{int: [low, high]}`, with `step` and `log` for ranges. Written back in
    that shorthand, with the canonical kind (float, int, choice)."""

    kind: Literal["choice", "float", "int"]
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, Distribution):
            return v
        forms = "{choice: [...]}, {float: [low, high]}, {int: [low, high]}, {loguniform: ...}"
        if not isinstance(v, Mapping):
            raise _conflict("", f"a distribution is one of {forms}; got {_shown(v)!r}")
        keys = [k for k in v if str(k).lower() in _KINDS]
        if len(keys) != 1:
            raise _conflict(
                "", f"give one distribution: {forms}; got {', '.join(map(str, v)) or 'nothing'}"
            )
        key = keys[0]
        kind, log = _KINDS[str(key).lower()]
        options = {k: val for k, val in v.items() if k != key}
        takes = ("step", "log") if kind != "choice" else ()
        for option in options:
            if option not in takes:
                raise _conflict(
                    "", f"{key} does not take {option}; it takes: {', '.join(takes) or 'nothing'}"
                )
        if kind == "choice":
            return {"kind": "choice", "choices": _choices(v[key])}
        if log and options.get("log") is False:
            raise _conflict("", f"{key} is on a log scale; remove log: false, or use uniform")
        return _range(kind, v[key], options.get("step"), log or options.get("log") is True)

    @model_serializer(mode="plain")
    def _written(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choice": self.choices}
        out: dict[str, Any] = {self.kind: [self.low, self.high]}
        if self.step is not None:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out

    @property
    def enumerable(self) -> bool:
        """Whether a grid can list its values: choices, int ranges, stepped float ranges."""
        return self.kind != "float" or self.step is not None

    def size(self) -> int:
        if self.kind == "choice":
            return len(self.choices or ())
        assert self.low is not None and self.high is not None and self.enumerable
        return round((self.high - self.low) / (self.step or 1)) + 1

    def values(self) -> list[Any]:
        """Every value a grid tries, in order."""
        if self.kind == "choice":
            return list(self.choices or ())
        assert self.low is not None and self.enumerable
        step = self.step or 1
        if self.kind == "int":
            return [int(self.low + i * step) for i in range(self.size())]
        # Written to twelve significant digits, so 0.1 + 2 * 0.1 reads back as 0.3.
        return [float(f"{self.low + i * step:.12g}") for i in range(self.size())]

    def probes(self) -> list[tuple[str, Any]]:
        """The values a job is validated with: every choice, or a range's ends and, for an
        unstepped float range, a point inside it no whole-number range lands on (so a float
        range over an integer field is found)."""
        if self.kind == "choice":
            return [(f"choice {_shown(json.dumps(c))}", c) for c in self.choices or ()]
        assert self.low is not None and self.high is not None
        out: list[tuple[str, Any]] = [
            (f"low {self.low}", self.low),
            (f"high {self.high}", self.high),
        ]
        if self.kind == "float" and self.step is None:
            golden = (math.sqrt(5) - 1) / 2
            if self.log:
                inside = math.exp(
                    math.log(self.low) + (1 - golden) * math.log(self.high / self.low)
                )
            else:
                inside = self.low + (1 - golden) * (self.high - self.low)
            out.append((f"{inside:.6g} (inside the range)", inside))
        return out

    def optuna_choices(self) -> list[Any]:
        """The choices as scalars a sampler stores: the values themselves, or each one's JSON
        text when any is a list or mapping (see `decode`)."""
        choices = self.choices or []
        if all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            return list(choices)
        return [_json_key(c) for c in choices]

    def decode(self, sampled: Any) -> Any:
        """The job's value for what a sampler returned from `optuna_choices`."""
        if self.kind != "choice" or sampled in (self.choices or []):
            return sampled
        return {_json_key(c): c for c in self.choices or []}[sampled]


def _choices(values: Any) -> list[Any]:
    if not isinstance(values, (list, tuple)):
        raise _conflict("", f"choice takes a list of values; got {_shown(values)!r}")
    if not values:
        raise _conflict("", "choice needs at least one value")
    if len(values) > MAX_CHOICES:
        raise _conflict("", f"at most {MAX_CHOICES} choices; got {len(values)}")
    seen: set[str] = set()
    for value in values:
        key = _json_key(value)
        if key in seen:
            raise _conflict("", f"choice lists {_shown(key)} twice")
        seen.add(key)
    return list(values)


def _range(kind: str, bounds: Any, step: Any, log: bool) -> dict[str, Any]:
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        raise _conflict("", f"{kind} takes [low, high]; got {_shown(bounds)!r}")
    low, high = (_number(b, kind) for b in bounds)
    if low >= high:
        raise _conflict("", f"low must be below high; got [{low}, {high}]")
    if log and low <= 0:
        raise _conflict("", f"a log scale needs low > 0; got {low}")
    if step is not None:
        step = _number(step, kind)
        if step <= 0:
            raise _conflict("", f"step must be greater than 0; got {step}")
        if log and step != 1:
            raise _conflict("", "a log scale takes no step; remove one of log and step")
        count = (high - low) / step
        if not math.isclose(count, round(count), rel_tol=1e-9, abs_tol=1e-9):
            raise _conflict(
                "",
                f"step {step} does not fit the range: high - low ({high - low:g}) is not "
                "a whole number of steps",
            )
    return {"kind": kind, "low": low, "high": high, "step": step, "log": log}


# ---------------------------------------------------------------- sampler, pruner, objective


def _named(key: str):
    def before(value: Any) -> Any:
        return {} if value is None else {key: value} if isinstance(value, str) else value

    return before


class SamplerSpec(_Spec):
    name: str = Field("tpe", description="grid, random, tpe (the default) or cmaes.")
    seed: Annotated[int, Field(ge=0, lt=INT32)] | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _sampler_name(cls, v: Any) -> str:
        return _canonical("sampler", v, SAMPLERS, SAMPLER_ALIASES)


_Steps = Annotated[int, Field(gt=0)]


class PrunerSpec(_Spec):
    """Stops trials that fall behind; the options left unset take defaults from the job."""

    name: str = Field("none", description="asha (successive_halving), hyperband, median, none.")
    min_steps: _Steps | None = Field(None, description="The job's eval_every, or a tenth.")
    max_steps: _Steps | None = Field(None, description="hyperband: the job's steps.")
    reduction_factor: Annotated[int, Field(ge=2)] | None = None
    min_early_stopping_rate: Annotated[int, Field(ge=0)] | None = None
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    startup_trials: Annotated[int, Field(ge=0)] | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _pruner_name(cls, v: Any) -> str:
        return _canonical("pruner", v, PRUNERS, PRUNER_ALIASES)

    @model_validator(mode="after")
    def _options(self) -> PrunerSpec:
        takes = PRUNER_OPTIONS[self.name]
        for option in sorted(set().union(*PRUNER_OPTIONS.values()) - takes):
            if getattr(self, option) is not None:
                listed = ", ".join(sorted(takes)) or "no options"
                raise _conflict(
                    option, f"pruner {self.name} does not take {option}; it takes: {listed}"
                )
        defaults = {
            "reduction_factor": 3,
            "min_early_stopping_rate": 0,
            "warmup_steps": 0,
            "startup_trials": 5,
        }
        for option, value in defaults.items():
            if option in takes and getattr(self, option) is None:
                setattr(self, option, value)
        return self


class ObjectiveSpec(_Spec):
    metric: str = Field(
        description="test_<m> (at the end), val_<m> (evaluations), or the stream's loss, "
        "accuracy or mae."
    )
    mode: Literal["min", "max"] | None = Field(None, description="max for accuracy-like metrics.")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Any:
        if v is None:
            return None
        mode = {"minimize": "min", "maximize": "max"}.get(str(v).lower(), str(v).lower())
        if mode not in ("min", "max"):
            raise _conflict("", f"mode is min or max; got {_shown(v)!r}")
        return mode

    @property
    def direction(self) -> str:
        return "maximize" if self.mode == "max" else "minimize"


class BudgetSpec(_Spec):
    steps: _Steps | None = Field(None, description="Training steps of all trials together.")
    seconds: Annotated[float, Field(gt=0)] | None = Field(
        None, description="Wall time of the experiment: seconds, or '30m', '2h'."
    )

    @field_validator("seconds", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _something(self) -> BudgetSpec:
        if self.steps is None and self.seconds is None:
            raise _conflict("", "give steps, seconds, or both; or remove budget")
        return self


# ---------------------------------------------------------------- the experiment


class ExperimentSpec(_Spec):
    """A search over a base job's fields. Parse with `ExperimentSpec.parse(data)` or
    `load_experiment(path)`; `apply` makes a trial's job."""

    name: str = "experiment"
    description: str | None = Field(None, max_length=4096)
    job: JobSpec = Field(description="The base job, inline (load_experiment also reads a path).")
    space: dict[str, Distribution] = Field(
        description="Dotted job field -> its values, e.g. optimizer.learning_rate: "
        "{loguniform: [0.0001, 0.1]}."
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    objective: ObjectiveSpec
    max_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] | None = Field(
        None, description="The grid's size for a grid; else required."
    )
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 1
    budget: BudgetSpec | None = None
    trial_priority: Annotated[int, Field(ge=-INT32, lt=INT32)] | None = Field(
        None, description="Each trial job's priority; the request's when unset."
    )

    @field_validator("name")
    @classmethod
    def _experiment_name(cls, v: str) -> str:
        if not _JOB_NAME.match(v):
            raise ValueError(
                "use 1-63 letters, digits, '_', '.', '-', starting with a letter/digit"
            )
        return v

    @field_validator("job", mode="before")
    @classmethod
    def _job(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, (str, Path)):
            # Only load_experiment reads files: a server must never open a path a tenant names.
            raise _conflict("", "a path is read only by load_experiment; give the job inline")
        try:
            return JobSpec.parse(v, (info.context or {}).get("limits"))
        except SpecError as exc:
            all_ = [(p.field, p.message) for p in exc.problems]
            raise PydanticCustomError(
                "spec_conflicts", "{summary}", {"summary": all_[0][1], "all": all_}
            ) from None

    @field_serializer("job")
    def _job_dict(self, job: JobSpec) -> dict[str, Any]:
        return job.to_dict()

    @field_validator("space", mode="before")
    @classmethod
    def _paths(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, Mapping):
            return v
        if not v:
            raise _conflict(
                "",
                "give at least one field to search, e.g. "
                "optimizer.learning_rate: {loguniform: [0.0001, 0.1]}",
            )
        if len(v) > MAX_DIMENSIONS:
            raise _conflict("", f"at most {MAX_DIMENSIONS} fields; got {len(v)}")
        for path in v:
            parts = str(path).split(".")
            if not all(p and set(p) <= _PATH_PART for p in parts):
                raise _conflict(_shown(path), "a dotted field path, e.g. optimizer.learning_rate")
        # Each path and each distribution checked here, so every bad one is named at once.
        job, out, problems = info.data.get("job"), {}, []
        for path, raw in v.items():
            missing = job and _missing_field(job, path)
            if missing:
                problems.append((path, missing))
                continue
            try:
                out[path] = Distribution.model_validate(raw)
            except ValidationError as exc:
                problems += [
                    (path if p.field == "<root>" else f"{path}.{p.field}", p.message)
                    for p in _problems(exc)
                ]
        if problems:
            raise PydanticCustomError(
                "spec_conflicts", "{summary}", {"summary": problems[0][1], "all": problems}
            )
        return out

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _named_shorthand(cls, v: Any) -> Any:
        return _named("name")(v)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_shorthand(cls, v: Any) -> Any:
        return _named("metric")(v)

    @model_validator(mode="after")
    def _against_the_job(self, info: ValidationInfo) -> ExperimentSpec:
        limits = (info.context or {}).get("limits")
        problems = [*self._space_problems(limits), *self._objective_problems()]
        problems += [*self._pruner_problems()]
        grid = [*self._grid_problems()]
        problems += grid or [*self._trial_problems()]
        if problems:
            raise PydanticCustomError(
                "spec_conflicts", "{summary}", {"summary": problems[0][1], "all": problems}
            )
        return self

    def _space_problems(self, limits: SpecLimits | None):
        for path, dist in self.space.items():
            for label, value in dist.probes():
                try:
                    apply(self.job, {path: value}, limits)
                except SpecError as exc:
                    p = exc.problems[0]
                    where = "" if p.field == path else f"{p.field}: "
                    yield f"space.{path}", f"{label} makes the job invalid: {where}{p.message}"
                    break

    def _objective_problems(self):
        metric, problem = _objective_metric(self.job, self.objective.metric)
        self.objective.metric = metric
        if self.objective.mode is None:
            self.objective.mode = "max" if metric.endswith(_MAXIMISED) else "min"
        if problem:
            yield "objective.metric", problem

    def _grid_problems(self):
        if self.sampler.name != "grid":
            return
        for path, dist in self.space.items():
            if not dist.enumerable:
                yield (
                    "sampler",
                    (
                        "grid needs every distribution to be a choice or an int/float range with "
                        f"step; space.{path} is a continuous range"
                    ),
                )
                return
        if (size := self.grid_size() or 0) > MAX_TRIALS:
            yield "sampler", f"the grid has {size} points, over {MAX_TRIALS}; use random or tpe"

    def _pruner_problems(self):
        p, steps = self.pruner, self._most_steps()
        if p.name in ("asha", "hyperband") and p.min_steps is None:
            p.min_steps = self.job.training.eval_every or (max(1, steps // 10) if steps else None)
            if p.min_steps is None:
                yield "pruner.min_steps", "the job counts epochs, not steps; give min_steps"
        if p.name == "hyperband" and p.max_steps is None:
            p.max_steps = steps
            if steps is None:
                yield "pruner.max_steps", "the job counts epochs, not steps; give max_steps"
        top, top_name = (p.max_steps, "max_steps") if p.max_steps else (steps, "the job's steps")
        if p.min_steps is not None and top is not None and p.min_steps >= top:
            yield (
                "pruner.min_steps",
                (
                    f"min_steps {p.min_steps} is not below {top_name} ({top}), so no trial "
                    "would be stopped early"
                ),
            )

    def _most_steps(self) -> int | None:
        """The most steps a trial may train: the job's, or the largest the space gives."""
        dist = self.space.get("training.steps")
        if dist is None:
            return self.job.training.steps
        if dist.kind == "choice":
            return max((c for c in dist.choices or () if isinstance(c, int)), default=None)
        return int(dist.high) if dist.high is not None else None

    def _trial_problems(self):
        size = self.grid_size() if self.sampler.name == "grid" else None
        if self.max_trials is None:
            if size is None:
                yield (
                    "max_trials",
                    f"required with sampler {self.sampler.name} (a grid's is its size)",
                )
                return
            self.max_trials = size
        if size is not None and self.max_trials > size:
            yield "max_trials", f"the grid has only {size} points; got {self.max_trials}"
        if self.max_concurrent_trials > self.max_trials:
            yield (
                "max_concurrent_trials",
                (f"at most max_trials ({self.max_trials}); got {self.max_concurrent_trials}"),
            )

    # --------------------------------------------------------- the grid, trials, loading

    def grid_size(self) -> int | None:
        """The number of grid points; None when a distribution is a continuous range."""
        if not all(d.enumerable for d in self.space.values()):
            return None
        return math.prod(d.size() for d in self.space.values())

    def grid_search_space(self) -> dict[str, list[Any]]:
        """Each path's values, as Optuna's GridSampler takes a search space."""
        if self.grid_size() is None:
            raise ValueError("a continuous range has no grid")
        return {path: dist.values() for path, dist in self.space.items()}

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid's values, the first path varying slowest."""
        space = self.grid_search_space()
        return [
            dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())
        ]

    @classmethod
    def parse(cls, data: Any, limits: SpecLimits | None = None) -> ExperimentSpec:
        """Validate a mapping and raise ExperimentError naming every bad field; with
        `limits`, the base job and every value the space reaches are held to them."""
        if isinstance(data, ExperimentSpec):
            return data if limits is None else cls.parse(data.to_dict(), limits)
        if not isinstance(data, Mapping):
            raise ExperimentError(
                [Problem("<root>", f"an experiment is a mapping, got {type(data).__name__}")]
            )
        try:
            return cls.model_validate(dict(data), context={"limits": limits})
        except ValidationError as exc:
            raise ExperimentError(_problems(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The wire form: the job inline, every default resolved."""
        return self.model_dump(mode="json", exclude_none=True)


def apply(job: JobSpec, params: Mapping[str, Any], limits: SpecLimits | None = None) -> JobSpec:
    """`job` with each dotted path in `params` set to its value, validated; `job` is left as it
    was. Raises SpecError naming the job's fields when a value makes it invalid."""
    data = job.to_dict()
    for path, value in params.items():
        missing = _missing_field(job, path)
        if missing:
            raise SpecError([Problem(path, missing)])
        node: Any = data
        parts = path.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                if node.get(part) is None:  # an unset section: the rest from its defaults
                    node[part] = {}
                node = node[part]
        last = parts[-1]
        node[int(last) if isinstance(node, list) else last] = value
    return JobSpec.parse(data, limits)


def _missing_field(job: JobSpec, path: str) -> str | None:
    """Why `path` names no field of `job`, listing what it could have named; None if it does."""
    node: Any = job
    done: list[str] = []
    for part in path.split("."):
        where = ".".join(done) or "the top"
        if isinstance(node, (type, BaseModel)):
            fields = node.model_fields if isinstance(node, type) else type(node).model_fields
            if part not in fields:
                return f"{path} is not a field of the job spec; {where} has: " + ", ".join(
                    sorted(fields)
                )
            value = None if isinstance(node, type) else getattr(node, part)
            node = value if value is not None else _model_of(fields[part].annotation)
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"{where} is a list of {len(node)}; give an index below {len(node)}"
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                keys = ", ".join(sorted(map(str, node))[:20]) or "no keys"
                return f"{path} is not a field of the job spec; {where} has: {keys}"
            node = node[part]
        else:
            return f"{path} is not a field of the job spec; {where} is a value, not a section"
        done.append(part)
    return None


def _model_of(annotation: Any) -> Any:
    """The model class an optional section holds (so paths into an unset one are known)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _objective_metric(job: JobSpec, given: str) -> tuple[str, str | None]:
    """The metric's canonical name, and why the job cannot report it (None if it can)."""
    metric = str(given).strip().lower().replace("-", "_")
    prefix, _, rest = (
        metric.partition("_") if metric.startswith(("val_", "test_")) else ("", "", metric)
    )
    if rest != "loss":
        with contextlib.suppress(names.UnknownNameError):
            rest = names.canonical("metric", rest)
    data = job.dataset
    tested = data.evaluate_on_test and (data.name not in names.STREAMED or data.test_path)
    # A job whose data alone tell its task (an npz without task) streams either.
    stream = ["loss", job.step_metric] if job.task else ["loss", "accuracy", "mae"]
    reported = [*stream, *job.monitorable] if job.training.eval_every else list(stream)
    if tested:
        reported += ["test_loss", *(f"test_{m}" for m in job.metrics or [])]
    valid = ", ".join(sorted(reported))
    if not prefix:
        name = {"mean_absolute_error": "mae"}.get(rest, rest)
        if name in stream:
            return name, None
        if name in ("accuracy", "mae"):
            return name, f"this {job.task} job streams loss and {job.step_metric}; valid: {valid}"
        return name, f"the stream reports only loss and {job.step_metric}; valid: {valid}"
    name = f"{prefix}_{rest}"
    if prefix == "val" and not job.training.eval_every:
        return name, f"{name} is reported by evaluations; set job.training.eval_every"
    if prefix == "test" and not tested:
        why = (
            "dataset.evaluate_on_test is false"
            if not data.evaluate_on_test
            else (f"dataset {data.name} has no test_path")
        )
        return name, f"this job reports no test metrics: {why}"
    if getattr(job.model, "several", False):
        # Several outputs report each metric per output, named by the model's own layers.
        return name, None
    if name not in reported:
        return name, f"{_shown(given)!r} is not reported by this job; valid: {valid}"
    return name, None


def load_experiment(
    source: str | Path | Mapping[str, Any] | ExperimentSpec,
    base_dir: str | Path | None = None,
    limits: SpecLimits | None = None,
) -> ExperimentSpec:
    """An experiment from a YAML/JSON file path or a mapping. A `job` given as a path is read
    relative to `base_dir`: the experiment file's folder by default, else the current one."""
    if isinstance(source, ExperimentSpec):
        return ExperimentSpec.parse(source, limits)
    if isinstance(source, Mapping):
        data: Any = source
    else:
        path = Path(source)
        base_dir = path.parent if base_dir is None else base_dir
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except OSError as exc:
            raise ExperimentError(
                [Problem("<file>", f"cannot read {path}: {exc.strerror}")]
            ) from None
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ExperimentError(
                [Problem("<file>", f"{path} is not valid YAML/JSON: {exc}")]
            ) from None
    if isinstance(data, Mapping) and isinstance(data.get("job"), (str, Path)):
        job_path = Path(base_dir or ".") / data["job"]
        try:
            job = load_spec(job_path)
        except SpecError as exc:
            raise ExperimentError(
                [
                    Problem("job" if p.field == "<file>" else f"job.{p.field}", p.message)
                    for p in exc.problems
                ]
            ) from None
        data = {**data, "job": job}
    return ExperimentSpec.parse(data if data is not None else {}, limits)


# ---------------------------------------------------------------- JSON Schema

EXPERIMENT_SCHEMA_ID = "https://stepstream.dev/schemas/experiment.schema.json"


def experiment_schema() -> dict[str, Any]:
    """The JSON Schema of an experiment file: pydantic's, with the job spec's own schema (names
    and shorthands included) for `job`, and the shorthands this module reads written out."""
    schema = ExperimentSpec.model_json_schema(mode="validation")
    job = job_spec_schema()
    defs = {k: schema["$defs"][k] for k in ("SamplerSpec", "PrunerSpec", "ObjectiveSpec")}
    defs.update(BudgetSpec=schema["$defs"]["BudgetSpec"], **job.pop("$defs"))
    defs["JobSpec"] = {k: v for k, v in job.items() if k not in ("$schema", "$id", "title")}
    pair = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
    options = {"step": {"type": "number", "exclusiveMinimum": 0}, "log": {"type": "boolean"}}
    defs["Distribution"] = {
        "oneOf": [
            {
                "type": "object",
                "properties": {key: {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES}}
                if kind == "choice"
                else {key: pair, **options},
                "required": [key],
                "additionalProperties": False,
            }
            for key, (kind, _) in _KINDS.items()
        ]
    }
    props = schema["properties"]
    props["job"] = {"anyOf": [{"$ref": "#/$defs/JobSpec"}, {"type": "string"}]}
    props["space"].update(
        minProperties=1,
        maxProperties=MAX_DIMENSIONS,
        additionalProperties={"$ref": "#/$defs/Distribution"},
    )
    for prop, valid in (
        ("sampler", sorted({*SAMPLERS, *SAMPLER_ALIASES})),
        ("pruner", sorted({*PRUNERS, *PRUNER_ALIASES})),
        ("objective", None),
    ):
        ref = {"$ref": f"#/$defs/{prop.title()}Spec"}
        props[prop] = {
            **{k: v for k, v in props[prop].items() if k != "$ref"},
            "anyOf": [{"type": "string", **({"enum": valid} if valid else {})}, ref],
        }
    for prop in ("sampler", "pruner"):
        defs[f"{prop.title()}Spec"]["properties"]["name"]["enum"] = props[prop]["anyOf"][0]["enum"]
    seconds = defs["BudgetSpec"]["properties"]["seconds"]
    seconds["anyOf"].insert(0, {"type": "string"})  # a duration: "30m", "2h"
    schema["$defs"] = defs
    schema.update(
        {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": EXPERIMENT_SCHEMA_ID}
    )
    schema["title"] = "stepstream experiment"
    return schema
