"""The one table from domain errors to gRPC status codes, with machine-readable details.

Every refused request carries a google.rpc.ErrorInfo (its reason, in the domain "stepstream");
a bad argument also carries a google.rpc.BadRequest with one field violation per problem, all
of them at once. INTERNAL means a bug, and its details stay in the server log.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import grpc
import sqlalchemy.exc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from stepstream.kernel.spec import SpecError
from stepstream_service.api.auth import Unauthenticated
from stepstream_service.errors import JobTooLarge, TrainerError
from stepstream_service.store import AlreadyExists, JobFinished, JobNotFound, QueueFull
from stepstream_service.store.errors import (
    ExperimentFinished,
    ExperimentNotFound,
    StorageQuotaExceeded,
)

log = logging.getLogger(__name__)
DOMAIN = "stepstream"


class InvalidArgument(TrainerError):
    """Request fields that are wrong, each named (a request field, or spec.<path>)."""

    reason = "invalid_argument"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.description = field, message
        self.violations = [(field, message)]

    @classmethod
    def each(cls, violations: list[tuple[str, str]]) -> InvalidArgument:
        """One error naming every problem of a request, so a client fixes them in one round."""
        if len(violations) == 1:
            return cls(*violations[0])
        exc = cls(*violations[0])
        lines = "\n".join(f"  {field}: {message}" for field, message in violations)
        exc.args = (f"invalid request ({len(violations)} problems):\n{lines}",)
        exc.violations = list(violations)
        return exc


class ResourceExhausted(TrainerError):
    reason = "resource_exhausted"


class Unavailable(TrainerError):
    reason = "unavailable"


class FailedPrecondition(TrainerError):
    """The request is sound but the job cannot answer it as it is (a model that cannot be
    exported to the format asked)."""

    reason = "failed_precondition"


ERRORS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (ExperimentNotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (JobFinished, grpc.StatusCode.FAILED_PRECONDITION),
    (ExperimentFinished, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (JobTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StorageQuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (sqlalchemy.exc.OperationalError, grpc.StatusCode.UNAVAILABLE),
    (sqlalchemy.exc.InterfaceError, grpc.StatusCode.UNAVAILABLE),
]


def status_for(exc: Exception) -> grpc.StatusCode:
    for kind, code in ERRORS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def violations(exc: Exception) -> list[tuple[str, str]]:
    """(field, description) of every bad field `exc` names; a spec's fields under spec."""
    if isinstance(exc, SpecError):
        return [(f"spec.{p.field}".removesuffix(".<root>"), p.message) for p in exc.problems]
    if isinstance(exc, InvalidArgument):
        return exc.violations
    return []


def _packed(detail: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(detail)
    return out


def rich_status(code: grpc.StatusCode, message: str, exc: Exception) -> grpc.Status:
    """The status with its details: ErrorInfo always, BadRequest when fields are wrong."""
    reason = getattr(exc, "reason", None) or ("spec_invalid" if isinstance(exc, SpecError) else "")
    details = []
    if reason:
        info = error_details_pb2.ErrorInfo(reason=reason.upper(), domain=DOMAIN)
        details.append(info)
    bad = violations(exc)
    if bad:
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in bad
            ]
        )
        details.append(request)
    packed = [_packed(detail) for detail in details]
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=packed)
    )


def handled(method: Callable) -> Callable:
    """Map domain errors to their status; log and report anything else as INTERNAL."""

    @functools.wraps(method)
    def unary(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Waited for a thread past its deadline: its caller has given up (and may retry
            # with the same request_id), so doing the work now would only add load.
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed in the queue")
        try:
            return method(self, request, context)
        except Exception as exc:
            abort(context, exc, method.__name__)

    @functools.wraps(method)
    def streaming(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:
            abort(context, exc, method.__name__)

    return streaming if inspect.isgeneratorfunction(method) else unary


def abort(context: grpc.ServicerContext, exc: Exception, rpc: str) -> None:
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", rpc)
        context.abort(code, f"internal error ({type(exc).__name__}); see the server log")
    if code == grpc.StatusCode.UNAVAILABLE and not isinstance(exc, Unavailable):
        context.abort(code, "the job store is unavailable; retry shortly")
    context.abort_with_status(rich_status(code, str(exc), exc))
