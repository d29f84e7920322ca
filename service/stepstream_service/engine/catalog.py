"""Every registry of the engine by kind, the dataset and architecture ones included: the
service's side of the kernel's names (tests check the two hold the same names)."""

from __future__ import annotations

from typing import Any

from stepstream.kernel import names
from stepstream_service.engine.datasets import LOADERS
from stepstream_service.engine.keras_models import BACKBONES
from stepstream_service.engine.models import ARCHITECTURES
from stepstream_service.engine.registry import (
    ACTIVATIONS,
    LAYERS,
    LOSSES,
    METRICS,
    OPTIMIZERS,
    SCHEDULES,
    Registry,
)

REGISTRIES: dict[str, Registry] = {
    "activation": ACTIVATIONS,
    "architecture": ARCHITECTURES,
    "backbone": BACKBONES,
    "dataset": LOADERS,
    "layer": LAYERS,
    "loss": LOSSES,
    "metric": METRICS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
}


def get(kind: str, name: str) -> Any:
    """The object registered as `name` (or an alias of it) for `kind`."""
    found = REGISTRIES.get(kind)
    if found is None:
        raise names.UnknownNameError(
            f"unknown kind {kind!r}; valid kinds: {', '.join(sorted(REGISTRIES))}"
        )
    return found.get(name)
