"""Migrations: a fresh database is created, an older one upgraded by `trainer migrate`, and one
written by a newer version refused, on both engines."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from stepstream_service.store import NewJob, Store, engine_url, schema
from tests.conftest import ENGINES


@pytest.fixture(params=ENGINES)
def url(request, database):
    return engine_url(database(request.param))


def test_a_fresh_database_gets_the_newest_schema(url):
    Store(url).close()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert schema.current(conn) == schema.head()
        assert {"jobs", "events", "workers"} <= set(sa.inspect(conn).get_table_names())
    engine.dispose()


def test_an_older_schema_is_refused_until_migrated(url):
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        schema.command.upgrade(schema.config(url, conn), "0001")
    with pytest.raises(schema.SchemaError, match=r"revision 0001.*trainer migrate"):
        Store(url, create=True)
    before, after = schema.upgrade(engine)
    assert (before, after) == ("0001", schema.head())
    store = Store(url)
    job, _ = store.create_job(NewJob(name="j", needs="gpu"))
    assert store.get_job(job.id).needs == "gpu"
    store.close()
    engine.dispose()


def test_a_schema_from_a_newer_version_is_refused(url):
    Store(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(schema.SchemaError, match=r"does not know.*newer version"):
        Store(url)
    with pytest.raises(schema.SchemaError, match="does not know"):
        schema.upgrade(engine)
    engine.dispose()


def test_a_database_from_before_migrations_is_stamped_and_upgraded(url):
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        schema.command.upgrade(schema.config(url, conn), "0001")
        conn.execute(sa.text("DROP TABLE alembic_version"))
    with pytest.raises(schema.SchemaError, match="before migrations"):
        Store(url)
    assert schema.upgrade(engine) == ("0001", schema.head())
    Store(url).close()
    engine.dispose()


def test_the_tables_match_the_migrations(url):
    """The models in schema.py and the migration history describe the same database."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    Store(url).close()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    engine.dispose()
    assert diff == []


def test_trainer_migrate_upgrades_and_says_what_it_did(url, capsys):
    from stepstream.cli import main

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        schema.command.upgrade(schema.config(url, conn), "0001")
    engine.dispose()
    assert main(["migrate", "--store", url]) == 0
    assert f"schema revision 0001 -> {schema.head()}" in capsys.readouterr().out
    assert main(["migrate", "--store", url]) == 0
    assert f"already at schema revision {schema.head()}" in capsys.readouterr().out


def test_a_server_refuses_to_start_on_a_schema_it_does_not_know(url):
    import subprocess
    import sys

    Store(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    for command in (["serve", "--port", "0", "--metrics-port", "0", "--workers", "0"], ["worker"]):
        done = subprocess.run(
            [sys.executable, "-m", "stepstream.cli", *command, "--store", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 5, done.stderr
        assert "'9999_future', which this version does not know" in done.stderr
