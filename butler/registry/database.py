"""Engines and transactions; every dialect-specific line of the registry lives here.

SQLite (the default, embedded) runs in WAL mode with foreign keys on and a busy timeout.  pysqlite's
own transaction handling is switched off so that SQLAlchemy issues BEGIN itself, and write
transactions use ``BEGIN IMMEDIATE``: a plain deferred BEGIN that later writes can fail with
"database is locked" when two processes write, whatever the busy timeout.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = [
    "make_engine",
    "write_transaction",
    "read_connection",
    "insert_or_ignore",
    "insert_many",
    "insert_committed",
    "fetch_rows",
    "select_rows",
    "has_json_aggregates",
    "json_columns",
    "json_count_and_values",
    "select_json_columns",
]

_BUSY_TIMEOUT_MS = 30_000
_WAL_CHECKPOINT_PAGES = 4000


def make_engine(url_or_path: str | Path, *, synchronous: str = "NORMAL") -> Engine:
    """Create an engine for a registry database.

    Parameters
    ----------
    url_or_path : str or Path
        An SQLAlchemy URL (``postgresql+psycopg://...``), or a filesystem path of an SQLite file.
    synchronous : {"NORMAL", "FULL"}
        SQLite's sync level: ``NORMAL`` (WAL: committed transactions survive a killed process)
        or ``FULL`` (also an operating-system crash or power loss).
    """
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
    text = str(url_or_path)
    url = text if "://" in text else f"sqlite:///{text}"
    if not url.startswith("sqlite"):
        return sa.create_engine(url, future=True)
    engine = sa.create_engine(url, future=True, poolclass=sa.pool.QueuePool, pool_size=4, max_overflow=8)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy (below) issue BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        # Checkpoint (and sync) the WAL every ~16 MB rather than SQLite's ~4 MB: each checkpoint
        # syncs whatever its size, and at the default they were ~40% of the registry's time over
        # 4000 puts (measured).  Commits are exactly as durable either way.
        cursor.execute(f"PRAGMA wal_autocheckpoint = {_WAL_CHECKPOINT_PAGES}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("diapipe_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def is_sqlite(engine: Engine) -> bool:
    """True for an SQLite engine."""
    return engine.dialect.name == "sqlite"


@contextlib.contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection inside a write transaction (``BEGIN IMMEDIATE`` on SQLite); commits on success."""
    with engine.connect() as conn:
        if is_sqlite(engine):
            conn = conn.execution_options(diapipe_begin="IMMEDIATE")
        with conn.begin():
            yield conn


@contextlib.contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside a read transaction (a consistent snapshot under WAL)."""
    with engine.connect() as conn, conn.begin():
        yield conn


def insert_or_ignore(table: sa.Table) -> Any:
    """An INSERT that skips rows whose primary key or unique constraint already exists."""
    return table.insert().prefix_with("OR IGNORE", dialect="sqlite").prefix_with("", dialect="postgresql")


@functools.lru_cache(maxsize=256)
def _positional_insert(
    table: sa.Table, columns: tuple[str, ...], dialect: sa.engine.Dialect
) -> tuple[str, tuple[int, ...] | None] | None:
    """The INSERT of ``columns`` compiled for a positional-parameter dialect, or None (named ones).

    Returns the SQL and, when its parameters come in another order than ``columns``, the
    position in ``columns`` of each parameter.
    """
    statement = table.insert().values({c: sa.bindparam(c) for c in columns})
    compiled = statement.compile(dialect=dialect, column_keys=list(columns))
    if not compiled.positiontup or sorted(compiled.positiontup) != sorted(columns):
        return None
    order = tuple(columns.index(name) for name in compiled.positiontup)
    return str(compiled), (None if order == tuple(range(len(columns))) else order)


def _driver_insert(
    engine: Engine, table: sa.Table, columns: Sequence[str], rows: Sequence[tuple]
) -> tuple[str, Sequence[tuple]] | None:
    """SQL and parameter tuples for the driver's ``executemany`` (SQLite), or None."""
    if not is_sqlite(engine):
        return None
    found = _positional_insert(table, tuple(columns), engine.dialect)
    if found is None:
        return None
    sql, order = found
    return sql, rows if order is None else [tuple(row[i] for i in order) for row in rows]


def insert_many(conn: Connection, table: sa.Table, columns: Sequence[str], rows: Sequence[tuple]) -> None:
    """Insert rows given as tuples of ``columns`` values, in the connection's transaction.

    On SQLite the compiled INSERT goes straight to the driver's ``executemany``: SQLAlchemy's
    per-row parameter processing cost ~8 us a row (measured on 48k HEALPix index rows), several
    times SQLite's own insert.  The values are still bound parameters.
    """
    if not rows:
        return
    driver = _driver_insert(conn.engine, table, columns, rows)
    if driver is not None:
        conn.exec_driver_sql(*driver)
        return
    statement = table.insert().values({c: sa.bindparam(c) for c in columns})
    conn.execute(statement, [dict(zip(columns, row, strict=True)) for row in rows])


def insert_committed(
    engine: Engine, table: sa.Table, columns: Sequence[str], rows: Sequence[tuple], *, before: Sequence[str] = ()
) -> None:
    """Insert rows in a write transaction of their own, committed when this returns.

    On SQLite the transaction runs on a pooled driver connection: ``BEGIN IMMEDIATE``, the
    compiled INSERT (bound parameters), ``COMMIT`` -- the same statements, pragmas and durability
    as :func:`write_transaction`.  Around a one-row insert, SQLAlchemy's Connection, events and
    result handling cost ~260 us of ~380 us (measured on puts: twice SQLite's own work).  Driver
    errors are raised as SQLAlchemy's (:class:`sqlalchemy.exc.IntegrityError` for a conflict),
    after a rollback.

    Parameters
    ----------
    engine : Engine
        The registry's engine.
    table : sqlalchemy.Table
        Where the rows go.
    columns : sequence of str
        Column names, in the order of each row's values.
    rows : sequence of tuple
        The values.
    before : sequence of str
        Statements without parameters run first in the same transaction (a new registry's DDL).
    """
    if not rows:
        return
    driver = _driver_insert(engine, table, columns, rows)
    if driver is None:
        with write_transaction(engine) as conn:
            for statement in before:
                conn.exec_driver_sql(statement)
            insert_many(conn, table, columns, rows)
        return
    sql, parameters = driver
    with _driver_cursor(engine, begin="BEGIN IMMEDIATE") as run:
        for statement in before:
            run(statement)
        run(sql, parameters, many=True)


@contextlib.contextmanager
def _driver_cursor(engine: Engine, *, begin: str | None = None) -> Iterator[Callable[..., Any]]:
    """A cursor of a pooled driver connection, as ``run(sql, parameters=(), many=False)``.

    With ``begin`` (``"BEGIN"`` or ``"BEGIN IMMEDIATE"``) the block is one transaction: committed
    when it ends, rolled back by the driver (a no-op when SQLite already rolled back) when it
    raises.  Driver errors are raised as SQLAlchemy's, naming the statement that failed.
    """
    dbapi = engine.dialect.loaded_dbapi
    connection = engine.raw_connection()
    current = [begin or ""]

    def run(sql: str, parameters: Any = (), many: bool = False) -> Any:
        current[0] = sql
        return cursor.executemany(sql, parameters) if many else cursor.execute(sql, parameters)

    try:
        cursor = connection.cursor()
        try:
            if begin:
                run(begin)
            yield run
            if begin:
                run("COMMIT")
        except BaseException:
            if begin:
                connection.rollback()
            raise
        finally:
            cursor.close()
    except dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(current[0], None, exc, dbapi.Error) from exc
    finally:
        connection.close()


def fetch_rows(conn: Connection, statement: Any) -> list[tuple]:
    """All rows of a SELECT as plain tuples.

    The statement runs through SQLAlchemy (compiled-statement cache, bound parameters); on SQLite
    the rows are then fetched from the driver cursor, as the tuples it makes, without
    SQLAlchemy's per-row Row objects: ~3x faster for tens of thousands of rows (measured on the
    spatial index tables).  SQLite's column types here need no result processing.
    """
    result = conn.execute(statement)
    if not is_sqlite(conn.engine):
        return [tuple(row) for row in result]
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


@functools.lru_cache(maxsize=256)
def _positional_select(
    statement: Any, dialect: sa.engine.Dialect
) -> tuple[str, tuple[str, ...], dict[str, Any]] | None:
    """A SELECT compiled for a positional-parameter dialect, its parameter names and their
    compiled-in values (literals), or None.

    None when the parameters are named, or when the SQL is only complete at execution time
    (expanding ``IN`` lists).
    """
    compiled = statement.compile(dialect=dialect)
    if compiled.positiontup is None or compiled.post_compile_params or compiled.literal_execute_params:
        return None
    return str(compiled), tuple(compiled.positiontup), dict(compiled.params)


def select_rows(engine: Engine, statement: Any, parameters: dict[str, Any]) -> list[tuple]:
    """All rows of a SELECT built once with named :func:`sqlalchemy.bindparam` values, as tuples.

    For a statement that is run many times with new values (a get's dataset lookup): on SQLite
    it is compiled once and then executed on a pooled driver connection, one statement in
    autocommit (a consistent snapshot by itself).  Building and executing it through SQLAlchemy
    for each call cost ~300 us of a ~550 us get, of which SQLite's work is ~15 us (measured).
    Elsewhere it runs through a SQLAlchemy connection.
    """
    compiled = _positional_select(statement, engine.dialect) if is_sqlite(engine) else None
    if compiled is None:
        with read_connection(engine) as conn:
            return [tuple(row) for row in conn.execute(statement, parameters)]
    sql, names, values = compiled
    values = {**values, **parameters}
    with _driver_cursor(engine) as run:
        return run(sql, [values[name] for name in names]).fetchall()


def positional_on_sqlite(engine: Engine, statement: Any) -> bool:
    """Whether :func:`select_json_columns` can run ``statement`` (SQLite, positional parameters)."""
    return is_sqlite(engine) and _positional_select(statement, engine.dialect) is not None


def has_json_aggregates(engine: Engine) -> bool:
    """Whether the engine is SQLite with the JSON functions (built in since SQLite 3.38 unless left out)."""
    if not is_sqlite(engine):
        return False
    try:
        with _driver_cursor(engine) as run:
            run("SELECT json_group_array(json_array(1))").fetchall()
    except sa.exc.OperationalError:
        return False
    return True


def json_columns(columns: Sequence[Any], *, first: Sequence[Any] = ()) -> Any:
    """One JSON array: ``first`` (JSON values), then ``json_group_array(column)`` of each column (SQLite).

    For :func:`select_json_columns`.
    """
    return sa.func.json_array(*first, *(sa.func.json_group_array(column) for column in columns))


def json_count_and_values(condition: Any, values: Sequence[Any]) -> Any:
    """``[number of rows where condition holds, *values]`` as one JSON array (SQLite)."""
    return sa.func.json_array(sa.func.count(sa.case((condition, 1))), *values)


class _InexactValue(Exception):
    """A REAL in a JSON array: SQLite writes it with 15 significant digits, not exactly."""


def _reject_real(text: str) -> Any:
    raise _InexactValue(text)


#: Decodes SQLite's JSON arrays; integers and text come back exactly as the driver returns them.
_JSON_DECODER = json.JSONDecoder(parse_float=_reject_real)
_JSON_BLOB_ERROR = "JSON cannot hold BLOB values"


def select_json_columns(engine: Engine, statement: Any) -> list[Any] | None:
    """The one value of a SELECT of :func:`json_columns`, decoded: a list per column, after ``first``.

    SQLite only, for statements of :func:`positional_on_sqlite`.  Returns None when a value
    cannot come back exactly as the driver would return it: a REAL (written with 15
    significant digits) or a BLOB (JSON cannot hold one); the caller then fetches rows.
    """
    try:
        ((text,),) = select_rows(engine, statement, {})
    except sa.exc.OperationalError as exc:
        if _JSON_BLOB_ERROR in str(exc.orig):
            return None
        raise
    try:
        return _JSON_DECODER.decode(text)
    except _InexactValue:
        return None
