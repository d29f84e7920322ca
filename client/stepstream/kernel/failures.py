"""Why a job failed: one shape from the trainer to the store, the wire and the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_MESSAGE_CHARS = 4096


@dataclass(frozen=True)
class Failure:
    """`reason` is a stable code (non_finite_loss, worker_lost, out_of_memory, ...)."""

    reason: str
    message: str
    step: int | None = None

    def __post_init__(self) -> None:
        # Sent with every answer about the job: a framework's error text can be any size.
        if len(self.message) > MAX_MESSAGE_CHARS:
            cut = " ... (cut)"
            kept = self.message[: MAX_MESSAGE_CHARS - len(cut)] + cut
            object.__setattr__(self, "message", kept)

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Failure | None:
        if not data:
            return None
        return cls(data["reason"], data.get("message") or "", data.get("step"))
