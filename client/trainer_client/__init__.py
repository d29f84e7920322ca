"""Client for the training service: job specs, events, and (later) the gRPC client and CLI."""

from trainer_client.names import UnknownNameError
from trainer_client.spec import JobSpec, Problem, SpecError, load_spec

__all__ = ["JobSpec", "Problem", "SpecError", "UnknownNameError", "load_spec"]
