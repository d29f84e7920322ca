"""What the store refuses, each with a stable reason; api.errors maps them to status codes."""

from __future__ import annotations

from stepstream_service.errors import TrainerError


class JobNotFound(TrainerError):
    reason = "not_found"


class AlreadyExists(TrainerError):
    reason = "already_exists"


class JobFinished(TrainerError):
    """The job is in a terminal state; nothing can change it any more."""

    reason = "job_finished"


class QueueFull(TrainerError):
    """A tenant has as many jobs waiting as it may."""

    reason = "queue_full"


class LeaseLost(TrainerError):
    """A worker wrote for a job it no longer holds (its lease expired and it was re-claimed)."""

    reason = "lease_lost"


class StorageQuotaExceeded(TrainerError):
    """A tenant keeps as many bytes stored as it may (tenant_storage_bytes)."""

    reason = "storage_quota_exceeded"


class ExperimentNotFound(TrainerError):
    reason = "not_found"


class ExperimentFinished(TrainerError):
    """The experiment is in a terminal state; nothing can change it any more."""

    reason = "experiment_finished"
