"""Shared by every test: the examples folder, and databases of both store engines.

PostgreSQL is the real server on 127.0.0.1:5432 (TRAINER_TEST_POSTGRES overrides the URL of its
maintenance database); every test that asks for it gets a fresh database, dropped afterwards.
It is never skipped: if it cannot be reached, those tests fail and say how to start it.
"""

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# A job whose loss leaves the floats within a few steps: it must fail as non_finite_loss.
DIVERGING = {
    "name": "diverges",
    "model": "linear",
    "dataset": {"name": "linear", "noise": 10},
    "optimizer": {"name": "sgd", "learning_rate": 1e6},
    "training": {"steps": 200, "batch_size": 100},
}
POSTGRES = os.environ.get("TRAINER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
ENGINES = ["sqlite", "postgresql"]


class Postgres:
    """Creates and drops throw-away databases on the test server."""

    def __init__(self, url: str):
        self.url = url
        self.created: list[str] = []
        self._admin = None
        self.execute("SELECT 1")

    def execute(self, sql: str) -> None:
        import psycopg

        try:
            self._connection().execute(sql)
        except psycopg.OperationalError:
            # A test restarted the server: this connection died with it; make a new one.
            self._admin = None
            self._connection().execute(sql)

    def _connection(self):
        import psycopg

        if self._admin is None or self._admin.closed:
            try:
                self._admin = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as exc:
                pytest.fail(
                    f"PostgreSQL at {self.url} is not reachable ({exc}); start it with "
                    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
                    pytrace=False,
                )
        return self._admin

    def create(self) -> str:
        name = f"trainer_test_{uuid.uuid4().hex[:12]}"
        self.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.remove(name)

    def close(self) -> None:
        for name in list(self.created):
            self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if self._admin is not None:
            self._admin.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg = Postgres(POSTGRES)
    yield pg
    pg.close()


@pytest.fixture
def database(request, tmp_path) -> Iterator[Callable[[str], str]]:
    """database(engine) -> a URL of a fresh, empty database of that engine."""
    made: list[str] = []

    def make(engine: str) -> str:
        if engine == "sqlite":
            url = f"sqlite:///{tmp_path / f'store-{len(made)}.db'}"
        else:
            url = request.getfixturevalue("postgres").create()
        made.append(url)
        return url

    yield make
    for url in made:
        if url.startswith("postgresql"):
            request.getfixturevalue("postgres").drop(url)


BUCKET = "artifacts"


@pytest.fixture(scope="session")
def s3() -> Iterator[dict[str, object]]:
    """A real S3 server (moto) on a free loopback port with one bucket; its fsspec options."""
    import fsspec
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # Its request log would bury the interesting part of a failure report.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}", "key": "test", "secret": "test"}
        fsspec.filesystem("s3", skip_instance_cache=True, **options).mkdir(BUCKET)
        yield options
    finally:
        server.stop()


def alive(pid: int) -> bool:
    """Running, or stopped; not a zombie waiting for a parent that never reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
