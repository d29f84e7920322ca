"""Domain errors of the training engine. The api module maps them to gRPC codes in one table."""

from __future__ import annotations


class TrainerError(Exception):
    """Base of every error the engine raises on purpose; `reason` is a stable short code."""

    reason = "training_error"


class DatasetUnavailable(TrainerError):
    """The data could not be found locally and could not be downloaded."""

    reason = "dataset_unavailable"


class DatasetInvalid(TrainerError):
    """The data exist but cannot feed this job (wrong arrays, shapes or labels)."""

    reason = "dataset_invalid"


class OutOfMemory(TrainerError):
    """The job does not fit in the memory of the worker that claimed it."""

    reason = "out_of_memory"


class JobTooLarge(TrainerError):
    """No worker of the pool could ever hold the job (or it is past max_job_bytes)."""

    reason = "job_too_large"
