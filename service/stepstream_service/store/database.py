"""The database both engines share: SQLite in WAL mode (the embedded default) or PostgreSQL
(scale-out), with the schema checked on connect.

On PostgreSQL, write transactions lock the job rows they change (claims skip rows another
claimer holds), and every transaction that appends events takes one advisory lock just before
its insert and holds it to commit (store.events), so event ids become visible in increasing
order and the event tail can read "everything after id N" without missing a slower, earlier
transaction. Callers append last in their transaction, so that lock is never held while waiting
for a row.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event

from stepstream_service.store import schema

# A database made by initdb under the C locale (usual in containers) is SQL_ASCII, where psycopg
# returns text as bytes unless the client asks for UTF-8; the server then passes bytes through.
POSTGRES_CONNECT = {"client_encoding": "utf8"}


def engine_url(url: str) -> str:
    """postgresql:// and postgres:// URLs use psycopg 3 (SQLAlchemy's default is psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **options: Any) -> sa.Engine:
    """An engine for a store URL, with what PostgreSQL connections need (POSTGRES_CONNECT)."""
    url = engine_url(url)
    if sa.make_url(url).get_backend_name() == "postgresql":
        options["connect_args"] = {**options.get("connect_args", {}), **POSTGRES_CONNECT}
    return sa.create_engine(url, **options)


class Database:
    """Engines for writing and for reading, and what every part of the store needs of them."""

    def __init__(self, url: str, *, create: bool = True):
        self.url = engine_url(url)
        self.dialect = sa.make_url(self.url).get_backend_name()
        self.postgres = self.dialect == "postgresql"
        if self.postgres:
            # pre_ping: after a database restart, stale pooled connections are replaced, not used.
            self.engine = make_engine(self.url, pool_pre_ping=True, pool_size=10)
            self.reader = self.engine
        else:
            self.engine = sa.create_engine(self.url)
            sa_event.listen(self.engine, "connect", _sqlite_pragmas)
            sa_event.listen(self.engine, "begin", _sqlite_begin_immediate)
            # Reads get their own engine without the write lock, so WAL readers never wait.
            self.reader = sa.create_engine(self.url)
            sa_event.listen(self.reader, "connect", _sqlite_pragmas)
        schema.check(self.engine, create=create)
        # The driver's placeholder, for the statements sent as driver SQL.
        self.mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    def _locked(self, query: sa.Select, *, skip_locked: bool = False) -> sa.Select:
        # SQLite's BEGIN IMMEDIATE already serialises writers; FOR UPDATE is PostgreSQL's way.
        return query.with_for_update(skip_locked=skip_locked) if self.postgres else query

    def _notify(self, conn: sa.Connection, channel: str, job_id: str) -> None:
        # Delivered at commit, ids only: listeners read the data from the tables.
        if self.postgres:
            conn.execute(sa.select(sa.func.pg_notify(channel, job_id)))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (the API, the tail) run while a worker writes; busy_timeout makes
    # writers queue up rather than fail.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _sqlite_begin_immediate(conn: sa.Connection) -> None:
    # Take the write lock at BEGIN so two claimers cannot both read the same queued job.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
