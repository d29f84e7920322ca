"""The store fails: the database goes away mid-run and comes back."""

from __future__ import annotations

import collections
import os
import subprocess
import time

import grpc
import pytest

from stepstream.client import TrainingClient
from tests.integration.test_service import classes, wait_for_step

from .conftest import assert_intact

pytestmark = pytest.mark.slow


def pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, "-m", "fast"]
        if action == "stop"
        else ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def engine():
    """A database server that can go away is PostgreSQL (SQLite is a file in the process)."""
    return "postgresql"


def test_the_database_down_for_ten_seconds_loses_nothing(start_service):
    """PostgreSQL stops for 10 s mid-job: RPCs answer UNAVAILABLE meanwhile, the worker keeps
    training and holds its events, then writes them; the queued job behind it runs too."""
    svc = start_service(workers=1, lease_seconds=30)
    codes: collections.Counter[str] = collections.Counter()
    with TrainingClient(svc.address) as c:
        running = c.submit(classes(20000, "through-restart", checkpoint_every=5000))
        queued = c.submit(classes(50, "behind-it"))
        wait_for_step(running, 200, timeout=120)
        pg_ctl("stop")
        try:
            end = time.monotonic() + 10
            while time.monotonic() < end:
                try:
                    running.info()
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
                time.sleep(0.2)
        finally:
            pg_ctl("start")
        first = running.wait(timeout=180)
        second = queued.wait(timeout=120)
        events = list(running.stream())
        after = c.submit(classes(20, "after-restart")).wait(timeout=120)
    assert codes["UNAVAILABLE"] > 0 and set(codes) <= {"UNAVAILABLE"}, codes
    assert (first.state, second.state, after.state) == ("SUCCEEDED",) * 3
    assert_intact(events, steps=20000, final="SUCCEEDED")
    assert first.attempts == 1  # the lease outlived the outage: never redelivered
