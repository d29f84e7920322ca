"""The API's codec: kernel values to protobuf and back, for the server and every client.

Events follow their dataclass fields by name (see `stepstream.kernel.events`); a field without
a protobuf twin fails at import, so the two cannot drift apart silently.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from stepstream.kernel.events import KINDS, PAYLOAD_FIELDS, Event, from_payload
from stepstream.kernel.failures import Failure
from stepstream.kernel.states import ExperimentState, JobState, TrialState
from stepstream.v1 import trainer_pb2 as pb

_PREFIX = "JOB_STATE_"
_EXPERIMENT_PREFIX = "EXPERIMENT_STATE_"
_TRIAL_PREFIX = "TRIAL_STATE_"
# The JobEvent oneof field of each kind, and the message type it holds.
ONEOF = {"step": "step", "eval": "eval", "checkpoint": "checkpoint", "log": "log",
         "state": "state_change", "result": "result"}  # fmt: skip
_KIND_OF = {field: kind for kind, field in ONEOF.items()}
_MESSAGE = {
    kind: pb.JobEvent.DESCRIPTOR.fields_by_name[field].message_type._concrete_class
    for kind, field in ONEOF.items()
}


def _plan(kind: str) -> tuple[tuple[str, str], ...]:
    """(field, how it travels) for each payload field of a kind: as a failure, a state, a map,
    a value that may be unset, or a plain value."""
    fields = _MESSAGE[kind].DESCRIPTOR.fields_by_name
    missing = [name for name in PAYLOAD_FIELDS[kind] if name not in fields]
    if missing:
        raise TypeError(f"{kind} events' fields {missing} have no protobuf field")

    def how(name: str) -> str:
        f = fields[name]
        if name in ("failure", "state"):
            return name
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            return "map"
        return "optional" if f.has_presence else "plain"

    return tuple((name, how(name)) for name in PAYLOAD_FIELDS[kind])


_PLANS = {kind: _plan(kind) for kind in KINDS}
# Kinds whose stored payload is already the protobuf body's fields (no failure, no state).
_AS_STORED = {
    k for k, plan in _PLANS.items() if all(how not in ("failure", "state") for _, how in plan)
}


def state_to_proto(state: JobState | str) -> int:
    return pb.JobState.Value(_PREFIX + JobState(state).value)


def state_from_proto(value: int) -> JobState:
    return JobState(pb.JobState.Name(value).removeprefix(_PREFIX))


def experiment_state_to_proto(state: ExperimentState | str) -> int:
    return pb.ExperimentState.Value(_EXPERIMENT_PREFIX + ExperimentState(state).value)


def experiment_state_from_proto(value: int) -> ExperimentState:
    return ExperimentState(pb.ExperimentState.Name(value).removeprefix(_EXPERIMENT_PREFIX))


def trial_state_to_proto(state: TrialState | str) -> int:
    return pb.TrialState.Value(_TRIAL_PREFIX + TrialState(state).value)


def trial_state_from_proto(value: int) -> TrialState:
    return TrialState(pb.TrialState.Name(value).removeprefix(_TRIAL_PREFIX))


def failure_to_proto(failure: Failure | None) -> pb.Failure | None:
    if failure is None:
        return None
    return pb.Failure(reason=failure.reason, message=failure.message, step=failure.step or 0)


def failure_from_proto(message: Any, field: str = "failure") -> Failure | None:
    """The failure in `message.<field>`, or None when it is unset."""
    if not message.HasField(field):
        return None
    f = getattr(message, field)
    return Failure(f.reason, f.message, f.step or None)


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def seconds(ts: timestamp_pb2.Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def event_to_proto(event: Event) -> pb.JobEvent:
    values: dict[str, Any] = {}
    for name, _ in _PLANS[event.kind]:
        value = getattr(event, name)
        if value is None:
            continue
        if name == "failure":
            value = failure_to_proto(value)
        elif name == "state":
            value = state_to_proto(value)
        values[name] = value
    body = _MESSAGE[event.kind](**values)
    return pb.JobEvent(seq=event.seq, time=timestamp(event.time), **{ONEOF[event.kind]: body})


def payload_to_proto(kind: str, payload: dict[str, Any], *, seq: int, time: float) -> pb.JobEvent:
    """A stored event straight to protobuf. The same as `event_to_proto(from_payload(...))`,
    without building the event first for the kinds stored as their body's fields: the watch
    fan-out converts every step event a job writes."""
    if kind in _AS_STORED:
        try:
            body = _MESSAGE[kind](**{k: v for k, v in payload.items() if v is not None})
        except ValueError:  # a key that rows written by an earlier version had
            pass
        else:
            return pb.JobEvent(seq=seq, time=timestamp(time), **{ONEOF[kind]: body})
    return event_to_proto(from_payload(kind, payload, seq=seq, time=time))


def event_from_proto(message: pb.JobEvent) -> Event:
    kind = _KIND_OF[message.WhichOneof("payload")]
    body = getattr(message, ONEOF[kind])
    values: dict[str, Any] = {}
    for name, how in _PLANS[kind]:
        if how == "failure":
            values[name] = failure_from_proto(body)
        elif how == "state":
            values[name] = state_from_proto(body.state)
        elif how == "map":
            values[name] = dict(getattr(body, name))
        elif how == "optional" and not body.HasField(name):
            values[name] = None
        else:
            values[name] = getattr(body, name)
    return KINDS[kind](**values, seq=message.seq, time=seconds(message.time))  # type: ignore[arg-type]


def events_of(response: pb.WatchJobResponse) -> list[Event]:
    """The events a WatchJob message carries (none for the snapshot)."""
    if response.WhichOneof("kind") != "batch":
        return []
    return [event_from_proto(message) for message in response.batch.events]
