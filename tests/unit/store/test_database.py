"""store.database: what the engines need of a PostgreSQL server they did not set up."""

from __future__ import annotations

import uuid

from stepstream_service.store import Store, schema
from stepstream_service.store.database import make_engine
from stepstream_service.store.wakeups import Wakeups
from tests.unit.store.conftest import make


def test_a_sql_ascii_database_works(postgres):
    """initdb under the C locale (many containers) makes SQL_ASCII databases, where psycopg
    hands text back as bytes unless the client asks for UTF-8."""
    name = f"trainer_test_{uuid.uuid4().hex[:12]}"
    postgres.execute(
        f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0 "
        "LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    postgres.created.append(name)
    url = postgres.url.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url)  # as `trainer migrate` does
    assert schema.upgrade(engine)[1] is not None
    engine.dispose()
    store = Store(url)
    try:
        job = make(store, name="café-naïve")
        assert store.get_job(job.id).name == "café-naïve"
    finally:
        store.close()
    wakeups = Wakeups(url, ("queue",)).start()
    wakeups.stop()
