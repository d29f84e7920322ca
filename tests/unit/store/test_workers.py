"""store.workers: what workers advertise, and when they go quiet."""

from __future__ import annotations

from tests.unit.store.conftest import make


def test_workers_advertise_devices_and_go_quiet(store):
    store.register_worker("w-gpu", "host-a", ["CPU:0", "GPU:0", "GPU:1"])
    store.register_worker("w-cpu", "host-b", ["CPU:0"])
    live = {w.id: w for w in store.live_workers(60)}
    assert live["w-gpu"].gpus == 2 and live["w-gpu"].devices[-1] == "GPU:1"
    assert live["w-cpu"].gpus == 0 and live["w-cpu"].host == "host-b"
    store.worker_seen("w-cpu", stopped=True)
    assert [w.id for w in store.live_workers(60)] == ["w-gpu"]
    make(store)
    job = store.claim("w-gpu", 30, gpus=2)
    assert store.busy_workers() == {"w-gpu"} and job.lease_owner == "w-gpu"


def test_workers_register_the_memory_a_job_must_fit_in(store):
    store.register_worker("w-big", "host-a", ["CPU:0"], 64 * 2**30)
    store.register_worker("w-old", "host-b", ["CPU:0"])  # a worker of an older version
    live = {w.id: w for w in store.live_workers(60)}
    assert live["w-big"].memory_bytes == 64 * 2**30  # past 2**31: a BIGINT column
    assert live["w-old"].memory_bytes is None
    store.register_worker("w-big", "host-a", ["CPU:0"], 8 * 2**30)  # restarted, smaller
    assert {w.id: w for w in store.live_workers(60)}["w-big"].memory_bytes == 8 * 2**30
