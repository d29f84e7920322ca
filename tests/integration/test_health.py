"""`trainer health --serve-file`: the container health check follows the server that is running
(whatever --port it was given) and checks it from where others reach it, so a server that
listens on loopback only, or that is gone, is unhealthy.

Each server here is a real `trainer serve` on port 0, on SQLite, with no workers."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.test_trust import outside_address
from tests.integration.conftest import ServiceProcess, service_env


def serve(tmp_path: Path, *flags: str, **settings: object) -> ServiceProcess:
    return ServiceProcess(
        tmp_path / "data",
        *flags,
        workers=0,
        store=f"sqlite:///{tmp_path / 'trainer.db'}",
        serve_file=tmp_path / "run" / "serve.json",
        **settings,
    )


def health(*args: str) -> subprocess.CompletedProcess:
    env = service_env()
    env.pop("TRAINER_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "stepstream.cli", "health", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_a_server_on_every_interface_is_checked_at_this_machines_own_address(tmp_path):
    served = tmp_path / "run" / "serve.json"
    svc = serve(tmp_path, "--host", "0.0.0.0", "--insecure")
    try:
        record = json.loads(served.read_text())
        assert record == {
            "pid": svc.proc.pid,
            "host": "0.0.0.0",
            "port": svc.port,
            "tls": False,
            "metrics_host": "127.0.0.1",
            "metrics_port": svc.metrics_port,
        }
        done = health("--serve-file", str(served))
        assert done.returncode == 0, done
        address, status = done.stdout.strip().rsplit(": ", 1)
        assert status == "SERVING", done.stdout
        host, port = address.rsplit(":", 1)
        assert int(port) == svc.port
        if outside_address() is None:
            assert host == "127.0.0.1" and "no address but loopback" in done.stderr, done
        else:
            # Not loopback: where a published port (docker run -p) arrives.
            assert not ipaddress.ip_address(host).is_loopback, done.stdout
        done = health("--serve-file", str(served), "-o", "json")
        assert done.returncode == 0, done
        reply = json.loads(done.stdout)
        assert reply["status"] == "SERVING" and reply["address"] == address, reply
        assert reply["pid"] == svc.proc.pid and reply["serve_file"] == str(served), reply
    finally:
        svc.stop()
    assert svc.proc.returncode == 0
    assert not served.exists(), "the serve file outlived its server"
    assert [p.name for p in served.parent.iterdir()] == [], "a temporary file was left behind"
    done = health("--serve-file", str(served))
    assert done.returncode == 1, done
    assert f"{served}: no server has started here (nothing written to {served})" in done.stderr


def test_a_server_on_loopback_only_is_unhealthy(tmp_path):
    served = tmp_path / "run" / "serve.json"
    svc = serve(tmp_path)
    try:
        assert json.loads(served.read_text())["host"] == "127.0.0.1"
        done = health("--serve-file", str(served))
        assert done.returncode == 1, done
        assert done.stdout == ""
        assert done.stderr.strip() == (
            "the server listens on 127.0.0.1 only: nothing outside this machine (or container) "
            "can reach it"
        ), done.stderr
        # Asked by address instead, it answers: the serve file is what tells the truth.
        assert health("--address", svc.address).returncode == 0
    finally:
        svc.stop()
    assert not served.exists()


def test_a_server_on_a_named_address_is_checked_there(tmp_path):
    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    tokens = tmp_path / "tokens"
    digest = hashlib.sha256(b"trn_health-test").hexdigest()
    tokens.write_text(f"ops sha256:{digest}\n")
    served = tmp_path / "run" / "serve.json"
    svc = serve(tmp_path, "--host", outside, tokens_file=tokens)
    try:
        # Health needs no token.
        done = health("--serve-file", str(served))
        assert done.returncode == 0, done
        assert done.stdout.strip() == f"{outside}:{svc.port}: SERVING"
    finally:
        svc.stop()


def test_no_serve_file_is_unhealthy(tmp_path):
    missing = tmp_path / "trainer-serve.json"
    done = health("--serve-file", str(missing))
    assert done.returncode == 1, done
    assert done.stderr.strip() == (
        f"{missing}: no server has started here (nothing written to {missing})"
    )


def test_a_serve_file_left_by_a_dead_server_is_unhealthy(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(gone.stdout)
    served = tmp_path / "serve.json"
    served.write_text(json.dumps({"pid": pid, "host": "0.0.0.0", "port": 1, "tls": False}))
    done = health("--serve-file", str(served))
    assert done.returncode == 1, done
    assert f"pid {pid}" in done.stderr and "not running" in done.stderr, done.stderr


def test_a_serve_file_that_is_no_json_is_unhealthy(tmp_path):
    served = tmp_path / "serve.json"
    served.write_text("{half")
    done = health("--serve-file", str(served))
    assert done.returncode == 1, done
    assert done.stderr.startswith(f"{served}: not a serve file"), done.stderr
