"""The store: jobs and their state machine, the queue and its leases, the event log, the
workers; one schema (store.schema) on SQLite or PostgreSQL (store.database)."""

from stepstream.kernel.states import TERMINAL, JobState
from stepstream_service.store.database import engine_url
from stepstream_service.store.errors import (
    AlreadyExists,
    JobFinished,
    JobNotFound,
    LeaseLost,
    QueueFull,
)
from stepstream_service.store.events import EVENTS_CHANNEL, EventRow, NewEvent
from stepstream_service.store.experiments import Experiment, Experiments, NewExperiment, Trial
from stepstream_service.store.jobs import QUEUE_CHANNEL, Job, NewJob, new_job_id
from stepstream_service.store.queue import Queue
from stepstream_service.store.workers import WorkerInfo, Workers


class Store(Queue, Experiments, Workers):
    """The one handle on the store: every part of it, on one pair of engines."""


__all__ = [
    "EVENTS_CHANNEL",
    "QUEUE_CHANNEL",
    "TERMINAL",
    "AlreadyExists",
    "EventRow",
    "Experiment",
    "Experiments",
    "Job",
    "JobFinished",
    "JobNotFound",
    "JobState",
    "LeaseLost",
    "NewEvent",
    "NewExperiment",
    "NewJob",
    "QueueFull",
    "Store",
    "Trial",
    "WorkerInfo",
    "engine_url",
    "new_job_id",
]
