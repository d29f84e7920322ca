"""The Node.js client test (tests/clients/node, `node --test`) against a real server.

A server with one CPU worker and a SQLite store starts on a free port, and node runs the tests
in tests/clients/node with STEPSTREAM_ADDRESS pointing at it: they load the .proto with
@grpc/proto-loader, train the linear regression, and read the BadRequest details of refused
specs. The packages come from package.json; if node_modules is missing or older than
package-lock.json, the test fails and says to run scripts/install-node.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
NODE_TESTS = ROOT / "tests" / "clients" / "node"
NODE_MODULES = ROOT / "node_modules"
PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs", "google-proto-files")
# The node tests bound themselves (deadlines, per-test timeouts); this is the backstop.
TIMEOUT = 420


def installed_stamp() -> Path:
    """The stamp scripts/install-node leaves once node_modules matches the package files."""
    digest = hashlib.sha256(
        (ROOT / "package.json").read_bytes() + (ROOT / "package-lock.json").read_bytes()
    ).hexdigest()[:16]
    return NODE_MODULES / f".installed-{digest}"


def require_node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Debian: apt-get install nodejs npm)", pytrace=False)
    missing = [p for p in PACKAGES if not (NODE_MODULES / p / "package.json").is_file()]
    if missing:
        pytest.fail(
            f"node_modules lacks {', '.join(missing)}: run scripts/install-node", pytrace=False
        )
    if not installed_stamp().is_file():
        pytest.fail(
            "node_modules is older than package.json/package-lock.json: run scripts/install-node",
            pytrace=False,
        )
    return node


def test_node_client(tmp_path):
    node = require_node()
    # The files themselves: node 20 searches a folder given to --test, node 22 takes globs.
    files = sorted(str(f.relative_to(ROOT)) for f in NODE_TESTS.glob("*.test.js"))
    assert files, f"no *.test.js in {NODE_TESTS}"
    service = ServiceProcess(tmp_path / "data", store=f"sqlite:///{tmp_path / 'trainer.db'}")
    try:
        env = dict(os.environ, STEPSTREAM_ADDRESS=service.address, NO_COLOR="1")
        try:
            run = subprocess.run(
                [node, "--test", "--test-reporter=spec", *files],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"node --test ran past {TIMEOUT}s:\n{exc.stdout}\n{exc.stderr}")
    finally:
        service.stop()
    if run.returncode != 0:
        log = service.log_path.read_text(errors="replace")[-4000:]
        pytest.fail(
            f"node --test exited {run.returncode}:\n{run.stdout}\n{run.stderr}\n"
            f"--- server log (tail) ---\n{log}",
            pytrace=False,
        )
