"""One codec for events and failures: worker -> store payload -> API protobuf -> client."""

from __future__ import annotations

import dataclasses
import json

import pytest

from stepstream.kernel import events, wire
from stepstream.kernel.events import (
    CheckpointEvent,
    EvalEvent,
    LogEvent,
    ResultEvent,
    StateEvent,
    StepEvent,
    from_payload,
    to_payload,
)
from stepstream.kernel.failures import Failure
from stepstream.kernel.states import ExperimentState, JobState, TrialState
from stepstream.v1 import trainer_pb2 as pb

FAILURE = Failure("non_finite_loss", "the loss became NaN", 17)
# Every field of every kind set to a value other than its default, so a field the codecs drop
# comes back different.
EXAMPLES = [
    StepEvent(7, 0.5, 0.875, None, 0.01, 900.0, 90000.0, time=1000.25, seq=4),
    StepEvent(8, 0.25, None, 0.125, 0.01, 900.0, 90000.0, time=1000.5, seq=5),
    EvalEvent(100, "validation", {"loss": 0.3, "accuracy": 0.9}, time=1001.0, seq=6),
    CheckpointEvent(100, "checkpoints/job-1/ckpt-100.keras", time=1002.0, seq=7),
    LogEvent("model built: 118,282 parameters", time=1003.0, level="warning", seq=8),
    StateEvent(JobState.FAILED, 2, time=1004.0, failure=FAILURE, seq=9),
    StateEvent(JobState.RUNNING, 1, time=1005.0, seq=10),
    ResultEvent(
        "failed",
        17,
        "non_finite_loss",
        test_metrics={"accuracy": 0.5},
        final_eval={"loss": 1.5},
        model_path="models/job-1.keras",
        failure=FAILURE,
        duration_seconds=12.5,
        time=1006.0,
        seq=11,
    ),
]


def test_the_examples_cover_every_kind():
    assert {e.kind for e in EXAMPLES} == set(events.KINDS)


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: f"{e.kind}-{e.seq}")
def test_an_event_survives_the_store_and_the_wire(event):
    # The store keeps the payload as JSON text, and the time and seq in columns.
    payload = json.loads(json.dumps(to_payload(event)))
    stored = from_payload(event.kind, payload, seq=event.seq, time=event.time)
    assert stored == event
    # The fan-out's shortcut from a stored payload says the same as the long way round.
    shortcut = wire.payload_to_proto(event.kind, payload, seq=event.seq, time=event.time)
    assert shortcut == wire.event_to_proto(stored)
    sent = wire.event_to_proto(stored).SerializeToString()
    received = wire.event_from_proto(type(wire.event_to_proto(stored)).FromString(sent))
    assert received == event


def test_rows_written_by_earlier_versions_still_read():
    old = {"state": "FAILED", "attempt": 1, "error": {"reason": "r", "message": "m", "step": 3}}
    assert from_payload("state", old).failure == Failure("r", "m", 3)
    result = {"outcome": "succeeded", "steps": 5, "stop_reason": "steps", "duration_s": 2.0}
    assert from_payload("result", result).duration_seconds == 2.0
    log = {"message": "m", "level": "info", "shown_to": "nobody"}  # a key no longer kept
    assert wire.payload_to_proto("log", log, seq=1, time=0.0).log.message == "m"


def test_every_event_field_has_a_protobuf_field_of_the_same_name():
    for kind, cls in events.KINDS.items():
        message = wire._MESSAGE[kind].DESCRIPTOR.fields_by_name
        for field in dataclasses.fields(cls):
            if field.name not in ("kind", "time", "seq"):
                assert field.name in message, (kind, field.name)


def test_states_travel_with_the_wire_prefix():
    for state in JobState:
        assert wire.state_from_proto(wire.state_to_proto(state)) is state
    assert wire.state_to_proto("QUEUED") == 1
    assert JobState.parse("job_state_running") is JobState.RUNNING
    with pytest.raises(ValueError, match="valid: CANCELLED, CANCELLING, FAILED"):
        JobState.parse("done")


@pytest.mark.parametrize(
    ("enum", "to_proto", "from_proto", "wire_enum", "prefix"),
    [
        (
            ExperimentState,
            wire.experiment_state_to_proto,
            wire.experiment_state_from_proto,
            pb.ExperimentState,
            "EXPERIMENT_STATE_",
        ),
        (
            TrialState,
            wire.trial_state_to_proto,
            wire.trial_state_from_proto,
            pb.TrialState,
            "TRIAL_STATE_",
        ),
    ],
    ids=["experiment", "trial"],
)
def test_experiment_and_trial_states_are_the_wire_enums_less_their_prefix(
    enum, to_proto, from_proto, wire_enum, prefix
):
    # Every kernel state has its wire value and back, and the wire has no state the kernel lacks.
    for state in enum:
        assert from_proto(to_proto(state)) is state
        assert wire_enum.Name(to_proto(state.value)) == prefix + state.value
    names = wire_enum.keys()
    named = {n.removeprefix(prefix) for n in names} - {"UNSPECIFIED"}
    assert named == {s.value for s in enum}
    with pytest.raises(ValueError):
        from_proto(0)  # UNSPECIFIED is no state


def test_a_failure_message_is_bounded():
    from stepstream.kernel.failures import MAX_MESSAGE_CHARS, Failure

    failure = Failure("internal_error", "x" * 100_000)
    assert len(failure.message) == MAX_MESSAGE_CHARS and failure.message.endswith("(cut)")
    assert Failure("internal_error", "short").message == "short"
