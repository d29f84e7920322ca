"""Compiled models a worker keeps between jobs, by shape, so that the next job of that shape
(an experiment's next trial, a resubmitted job) starts without building and tracing again.

What Keras makes reusable: a compiled model keeps its traced train, test and predict functions
until it is compiled again, and those functions read the model's and the optimizer's variables,
not copies of them. Assigning new values to every variable therefore gives a job of the same
shape a fresh start on the same traced program. That covers the weights and the dropout seeds
(a freshly built model of the job's seed supplies them), the optimizer's slots and step count
(as they were right after it was built) and a constant learning rate (a variable of the
optimizer). Everything else the trace bakes in as a constant is part of the shape: the
model's config, the loss, the optimizer's other hyperparameters and any schedule, the metrics,
the steps per device call, XLA and the precision. See engine.trainer for what goes into the key.

Plain Python, no framework: the worker makes one before it imports Keras.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any


def shape_key(parts: dict[str, Any]) -> str:
    """A digest of what a traced training program depends on."""
    text = json.dumps(parts, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class ModelCache:
    """Entries up to `budget` bytes of variables in all, the least recently used dropped first;
    an entry larger than the budget is not kept (0 keeps none). An entry is taken out while a
    job uses it and given back when the job ends without raising, so a job that broke off
    part-way never hands its model to the next one."""

    def __init__(self, budget: int):
        self.budget = max(0, int(budget))
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.hits = self.misses = 0

    def take(self, key: str) -> Any | None:
        entry, _ = self._entries.pop(key, (None, 0))
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def give_back(self, key: str, entry: Any, nbytes: int) -> None:
        if self.budget == 0 or nbytes > self.budget:
            return
        self._entries[key] = (entry, nbytes)
        while self.nbytes > self.budget:
            self._entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
