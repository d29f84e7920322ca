"""Which tenant's job a free worker takes next: fair share between tenants, by weight.

The policy, in the order it applies:
1. A tenant running `max_running` jobs already (the per-tenant cap; none by default) waits.
2. The tenant with the fewest devices in use per unit of weight goes first: a tenant with
   nothing running always comes before one with something running, so no tenant that has work
   waits while another with more devices per weight is served. A tenant with weight 2 gets
   twice the devices of one with weight 1 when both have work.
3. Ties: the tenant whose first job has the higher priority, then the one waiting longer.
Within a tenant, jobs go by priority, then age. A worker takes the first job in that order
that fits it, so a job that asks for more devices than a worker holds is passed over only by
workers too small for it (backfill); a worker large enough takes it before any job queued
after it: a stream of small jobs cannot starve it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stepstream_service.config import Settings


@dataclass(frozen=True)
class Waiting:
    """A tenant's queued work that a worker could run: its first job's priority and age."""

    tenant: str
    priority: int
    queued_at: float


@dataclass(frozen=True)
class Usage:
    """What a tenant has running: jobs and the devices they hold."""

    jobs: int = 0
    devices: int = 0


@dataclass(frozen=True)
class FairShare:
    weights: Mapping[str, float] = field(default_factory=dict)
    max_running: int | None = None  # jobs per tenant; None: no cap

    @classmethod
    def of(cls, settings: Settings) -> FairShare:
        return cls(settings.tenant_weights, settings.max_running_per_tenant)

    def weight(self, tenant: str) -> float:
        return float(self.weights.get(tenant, 1.0))

    def capped(self, usage: Usage) -> bool:
        return self.max_running is not None and usage.jobs >= self.max_running

    def order(self, waiting: Iterable[Waiting], running: Mapping[str, Usage]) -> list[str]:
        """The tenants a free worker serves, first to last; capped ones left out."""
        eligible = [w for w in waiting if not self.capped(running.get(w.tenant, Usage()))]
        eligible.sort(
            key=lambda w: (
                running.get(w.tenant, Usage()).devices / self.weight(w.tenant),
                -w.priority,
                w.queued_at,
                w.tenant,
            )
        )
        return [w.tenant for w in eligible]


EVEN = FairShare()  # every tenant weight 1, no cap
