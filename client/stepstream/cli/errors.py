"""How the `trainer` command fails: its exit codes, `CliError` (a failure it explains in its
own words), and what it prints for a failed RPC (the no-server hint, the field violations of
INVALID_ARGUMENT)."""

from __future__ import annotations

from typing import Any

STATE_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "CANCELLED": 3}
# Exit codes: 0 done, 1 the job failed, 2 bad input, 3 the job was cancelled, 4 the server
# refused or could not be reached, 5 the store's schema (server side), 130 interrupted.
EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 2, 4, 130


class CliError(Exception):
    """A failure the command explains in its own words: printed as is, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- gRPC errors

_UNREACHABLE = (
    "failed to connect to all addresses",
    "errors resolving",
    "dns resolution failed",
    "connections to all backends failing",
    "connection refused",
)


def unreachable(details: str) -> bool:
    """Does an UNAVAILABLE status's text say that no server could be reached at all?"""
    text = details.lower()
    return any(marker in text for marker in _UNREACHABLE)


def _why_unreachable(details: str) -> str:
    text = details.lower()
    if "connection refused" in text:
        return "connection refused"
    if "resolv" in text or "domain name not found" in text:
        return "the host name does not resolve"
    if "socket closed" in text:
        return (
            "it closed the connection at once: it may require TLS (--tls, --ca-cert) or a "
            "client certificate (--client-cert, --client-key)"
        )
    if "handshake" in text or "ssl" in text or "tls" in text:
        return "the TLS handshake failed; check --tls and the certificates"
    return details.rsplit(": ", 1)[-1].strip() or "no connection"


def no_server_hint(address: str, details: str = "") -> str:
    reason = f" ({_why_unreachable(details)})" if details else ""
    return (
        f"error: no server answers at {address}{reason}: start one with `trainer serve`, "
        "or pass --address / set TRAINER_ADDRESS"
    )


def field_violations(exc: Any) -> list[tuple[str, str]]:
    """(field, description) of each google.rpc.BadRequest field violation an RPC error carries."""
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(exc)
    except Exception:  # no details, or a status that does not match the call's
        return []
    out = []
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def rpc_error_text(exc: Any, address: str) -> str:
    """What to print for a failed RPC: the no-server hint, or the code, the message and (for
    INVALID_ARGUMENT) one line per field violation."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or ""
    name = getattr(code, "name", "UNKNOWN")
    hint = getattr(exc, "hint", None)  # what the client knows its connection lacked
    if name == "UNAVAILABLE" and hint:
        return f"error: the server at {address} closed the connection at once: {hint}"
    if name == "UNAVAILABLE" and unreachable(details):
        return no_server_hint(address, details)
    violations = field_violations(exc) if name == "INVALID_ARGUMENT" else []
    if not violations:
        return f"error: {name}: {details}" if details else f"error: {name}"
    lines = [f"{f}: {d}" for f, d in violations]
    head = details.splitlines()[0] if details else ""
    if head in lines:  # a violation that is the message itself
        if len(lines) == 1:
            return f"error: {name}: {head}"
        head = ""
    first = f"error: {name}: {head}" if head else f"error: {name}"
    return "\n".join([first, *(f"  {line}" for line in lines)])
