"""Request fields in, protobuf out: job names, filters, specs, jobs. Protobuf stops here."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from stepstream.kernel.spec import JobSpec, SpecLimits
from stepstream.kernel.states import JobState
from stepstream.kernel.wire import failure_to_proto, state_to_proto, timestamp
from stepstream.v1 import trainer_pb2 as pb
from stepstream_service.api.errors import InvalidArgument
from stepstream_service.store import Job

_JOB_NAME = re.compile(r"(?:jobs/)?(job-[0-9a-f]{1,40})")
_FILTER_TERM = re.compile(r"^(state|name|label\.[A-Za-z0-9_.-]+)=([^\s\x00]+)$")


def job_id_of(name: str, field: str = "name") -> str:
    """The id in a job's resource name; a name of another shape is a bad argument (a
    well-formed name of no job is NOT_FOUND, from the store)."""
    match = _JOB_NAME.fullmatch(name)
    if not match:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidArgument(field, f"{shown!r} is no job name; they look like jobs/job-1a2b...")
    return match.group(1)


def spec_of(text: str, limits: SpecLimits, max_bytes: int | None = None) -> JobSpec:
    """The validated spec in a request's spec_json: every problem at once, or SpecError."""
    required = "the job spec as JSON text (see GetJobSpecSchema)"
    return JobSpec.parse(json_of(text, required, max_bytes), limits=limits)


def json_of(text: str, required: str, max_bytes: int | None = None) -> Any:
    """A request's spec_json read as JSON: present, within max_spec_bytes, finite numbers."""
    if not text.strip():
        raise InvalidArgument("spec_json", f"required: {required}")
    size = len(text.encode())
    if max_bytes is not None and size > max_bytes:
        raise InvalidArgument(
            "spec_json", f"{size} bytes, over this server's limit of {max_bytes} (max_spec_bytes)"
        )

    def refuse(constant: str) -> Any:
        raise InvalidArgument("spec_json", f"{constant} is no JSON number; every number is finite")

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InvalidArgument("spec_json", f"not valid JSON ({exc.msg} at {where})") from None


def spec_hash(spec: JobSpec, priority: int, max_attempts: int) -> str:
    body = json.dumps([spec.to_dict(), priority, max_attempts], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def downsample(n: int, max_points: int) -> list[int]:
    """Indices of at most max_points evenly spread points, always keeping the last."""
    if max_points <= 0 or n <= max_points:
        return list(range(n))
    stride = n / max_points
    picked = sorted({min(int(i * stride), n - 1) for i in range(max_points)} | {n - 1})
    return picked[-max_points:]


MAX_FILTER_CHARS = 2048


def parse_filter(text: str) -> dict[str, Any]:
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidArgument("filter", f"at most {MAX_FILTER_CHARS} characters, not {len(text)}")
    out: dict[str, Any] = {"states": [], "labels": {}, "name": None}
    for term in text.replace(" AND ", " ").split():
        match = _FILTER_TERM.match(term)
        if not match:
            shown = term if len(term) <= 80 else term[:80] + "..."
            raise InvalidArgument(
                "filter", f"cannot read {shown!r}; use state=RUNNING, name=NAME, label.KEY=VALUE"
            )
        key, value = match.groups()
        if key == "state":
            try:
                out["states"].append(JobState.parse(value))
            except ValueError as exc:
                raise InvalidArgument("filter", str(exc)) from None
        elif key == "name":
            out["name"] = value
        else:
            out["labels"][key.removeprefix("label.")] = value
    return out


def job_to_proto(job: Job) -> pb.Job:
    return pb.Job(
        name=f"jobs/{job.id}",
        display_name=job.name,
        state=state_to_proto(job.state),
        spec_json=json.dumps(job.spec),
        labels=job.labels,
        priority=job.priority,
        create_time=timestamp(job.created_at),
        start_time=timestamp(job.started_at),
        end_time=timestamp(job.finished_at),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        failure=failure_to_proto(job.failure),
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss or 0.0,
        accuracy=job.accuracy,
        mae=job.mae,
        test_metrics=job.test_metrics,
        model_available=bool(job.model_path),
        last_seq=job.last_seq,
        request_id=job.request_id or "",
        worker=job.worker or "",
    )
