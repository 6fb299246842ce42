"""The private database connections of the database strategy (and of the periods records of
the database and postgres strategies): one per thread and alias, in autocommit mode, never the
caller's, so a lock or a record never joins, commits or rolls back the caller's transaction.
Plus what tells a statement lost to concurrent ones from a real failure, and creating a table
when it is missing."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from django.db import DatabaseError, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.errors import LockIOError

_local = threading.local()


class Contended(Exception):
    """The database gave up on a statement because of concurrent ones; trying again is fine."""


_abandoned: list[Any] = []


def _forget_after_fork() -> None:
    # Never close the parent's sockets from the child; keep them unreachable instead.
    _abandoned.append(getattr(_local, "__dict__", {}).copy())
    _local.__dict__.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def private_connection(alias: str) -> BaseDatabaseWrapper:
    """This thread's private connection to ``alias``, made on first use."""
    wrappers: dict[str, BaseDatabaseWrapper] = _local.__dict__.setdefault("wrappers", {})
    if alias not in wrappers:
        wrappers[alias] = connections.create_connection(alias)
    return wrappers[alias]


def close_private_connection(alias: str) -> None:
    """Close this thread's private connection to ``alias``, if it has one."""
    wrappers: dict[str, BaseDatabaseWrapper] = _local.__dict__.get("wrappers", {})
    connection = wrappers.pop(alias, None)
    if connection is not None:
        connection.close()


def run_statement(
    connection: BaseDatabaseWrapper, sql: str, params: list[Any], fetch: bool = False
) -> Any:
    """Run one statement on ``connection``: its rows if ``fetch``, else its row count."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if fetch else cursor.rowcount


#: How a transaction starts, per vendor: at READ COMMITTED, where every statement sees what
#: was committed before it began (whatever the database's default), and on SQLite with the
#: write lock taken at once. Other vendors: Django's ``set_autocommit(False)``.
_BEGIN = {
    "postgresql": ["BEGIN ISOLATION LEVEL READ COMMITTED"],
    "mysql": ["SET TRANSACTION ISOLATION LEVEL READ COMMITTED", "START TRANSACTION"],
    "sqlite": ["BEGIN IMMEDIATE"],
}


@contextlib.contextmanager
def transaction(connection: BaseDatabaseWrapper) -> Iterator[None]:
    """Run the block's statements on ``connection`` (in autocommit mode) as one transaction:
    committed when the block ends, rolled back when it raises."""
    begin = _BEGIN.get(connection.vendor)
    if begin is None:
        connection.set_autocommit(False)
    else:
        with connection.cursor() as cursor:
            for statement in begin:
                cursor.execute(statement)
    try:
        yield
    except BaseException:
        with contextlib.suppress(DatabaseError):
            _end(connection, begin is not None, "ROLLBACK")
        raise
    _end(connection, begin is not None, "COMMIT")


def _end(connection: BaseDatabaseWrapper, by_statement: bool, how: str) -> None:
    if by_statement:
        with connection.cursor() as cursor:
            cursor.execute(how)
        return
    try:
        connection.commit() if how == "COMMIT" else connection.rollback()
    finally:
        connection.set_autocommit(True)


#: MySQL/MariaDB: deadlock, lock wait timeout. SQLite: another connection is writing.
_CONTENTION_CODES = (1213, 1205)
#: PostgreSQL: serialization failure, deadlock, lock not available.
_CONTENTION_STATES = ("40001", "40P01", "55P03")


def contended(error: DatabaseError) -> bool:
    """The database gave up on a statement because of concurrent ones: trying again is fine."""
    cause = error.__cause__
    code = cause.args[0] if cause is not None and cause.args else None
    state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return (
        code in _CONTENTION_CODES
        or state in _CONTENTION_STATES
        or "database is locked" in str(error)
    )


def ensure_table(
    connection: BaseDatabaseWrapper, alias: str, model: type[models.Model], what: str
) -> bool:
    """Create ``model``'s table (``what``, for messages) unless it exists; fine when another
    process races to it. True if it existed already. Raises ``LockIOError`` if the database is
    unreachable or the table cannot be made."""
    table = model._meta.db_table
    try:
        if table in connection.introspection.table_names():
            return True
        with connection.schema_editor() as editor:
            editor.create_model(model)
    except DatabaseError as e:  # another process created it first, or the database is down
        try:
            exists = table in connection.introspection.table_names()
        except DatabaseError:
            raise LockIOError(f"Database {alias!r} is unreachable: {e}") from e
        if not exists:
            raise LockIOError(f"Could not create the {what} in {alias!r}: {e}") from e
    return False
