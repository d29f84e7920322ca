"""A store on each engine for every test here, and a job to put in it."""

from __future__ import annotations

import pytest

from stepstream_service.store import NewJob, Store
from tests.conftest import ENGINES


@pytest.fixture(params=ENGINES)
def store(request, database):
    s = Store(database(request.param))
    yield s
    s.close()


def make(store, name="j", priority=0, request_id=None, spec_hash="h", max_attempts=3):
    job, _ = store.create_job(
        NewJob(
            name=name,
            spec={"name": name},
            spec_hash=spec_hash,
            priority=priority,
            request_id=request_id,
            max_attempts=max_attempts,
        )
    )
    return job
