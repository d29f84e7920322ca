"""Client for the training service: job specs, events, and (later) the gRPC client and CLI."""

from stepstream.kernel.names import UnknownNameError
from stepstream.kernel.spec import JobSpec, Problem, SpecError, load_spec

__all__ = ["JobSpec", "Problem", "SpecError", "UnknownNameError", "load_spec"]
