"""api.errors: the status table and the details a refused request carries."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy.exc

from stepstream.kernel.spec import SpecError
from stepstream_service.api import errors as api
from stepstream_service.store import AlreadyExists, JobFinished, JobNotFound


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (SpecError([]), grpc.StatusCode.INVALID_ARGUMENT),
        (JobNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (JobFinished("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (api.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (api.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (sqlalchemy.exc.OperationalError("s", {}, Exception("down")), grpc.StatusCode.UNAVAILABLE),
        (ZeroDivisionError(), grpc.StatusCode.INTERNAL),
    ],
)
def test_error_table(exc, code):
    assert api.status_for(exc) == code


def test_a_bad_spec_carries_every_problem_as_a_field_violation():
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    from stepstream.kernel.spec import JobSpec

    try:
        JobSpec.parse({"modle": "mlp", "training": {"steps": -1}, "loss": "nope"})
    except SpecError as exc:
        problem = exc
    status = api.rich_status(grpc.StatusCode.INVALID_ARGUMENT, str(problem), problem)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    trailer = dict(status.trailing_metadata)[rpc_status.GRPC_DETAILS_METADATA_KEY]
    details = status_pb2.Status.FromString(trailer).details
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert details[0].Unpack(info) and details[1].Unpack(bad)
    assert (info.reason, info.domain) == ("SPEC_INVALID", "stepstream")
    fields = sorted(v.field for v in bad.field_violations)
    assert fields == ["spec.loss.name", "spec.modle", "spec.training.steps"]


def test_an_empty_spec_is_one_violation_at_the_spec_itself():
    from stepstream.kernel.spec import JobSpec

    with pytest.raises(SpecError) as caught:
        JobSpec.parse({})
    assert api.violations(caught.value) == [
        ("spec", "the spec is empty; give at least its dataset")
    ]


def test_every_problem_of_a_request_is_one_error():
    one = api.InvalidArgument.each([("priority", "must be between -1000 and 1000")])
    assert str(one) == "priority: must be between -1000 and 1000"
    both = api.InvalidArgument.each([("spec.loss.name", "unknown loss"), ("priority", "too high")])
    assert api.violations(both) == [("spec.loss.name", "unknown loss"), ("priority", "too high")]
    assert str(both).startswith("invalid request (2 problems):")
