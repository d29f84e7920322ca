"""Why a job failed: one shape from the trainer to the store, the wire and the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Failure:
    """`reason` is a stable code (non_finite_loss, worker_lost, out_of_memory, ...)."""

    reason: str
    message: str
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, "step": self.step}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Failure | None:
        if not data:
            return None
        return cls(data["reason"], data.get("message") or "", data.get("step"))
