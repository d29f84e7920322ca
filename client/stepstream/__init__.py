"""The training service's client: job specs (validated here, no TensorFlow needed), the sync and
asyncio clients (`stepstream.client`, `stepstream.aio`), and the `trainer` command."""

from stepstream.kernel.failures import Failure
from stepstream.kernel.names import UnknownNameError
from stepstream.kernel.spec import JobSpec, Problem, SpecError, load_spec
from stepstream.kernel.states import JobState

__all__ = [
    "Failure",
    "JobSpec",
    "JobState",
    "Problem",
    "SpecError",
    "UnknownNameError",
    "load_spec",
]
