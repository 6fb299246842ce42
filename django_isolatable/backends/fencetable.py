"""The fence table ``django_isolatable_fence``: each vendor's statement that records a fencing
token, and creating the table when it is missing.

Recording is one statement: an upsert that keeps the greater of the stored and the given token
and returns it (``RETURNING``: PostgreSQL, SQLite 3.35+, MariaDB 10.5+); MySQL, which has no
``RETURNING``, reads the row back in a second one. The row the upsert writes stays locked until
the caller's transaction ends.

The table is made when it is missing, and two processes racing to it are both fine. On SQLite
and MySQL, whose transactions go on after a failed statement, when the upsert finds it missing;
on PostgreSQL, where that would abort the caller's transaction, it is looked for before the
first fence of each process in a database. SQLite makes it in the caller's transaction (its
DDL is transactional, and another connection would wait for the caller's write lock); the
others on a connection of its own, since MySQL's DDL commits the open transaction.
"""

from __future__ import annotations

from django.db import DatabaseError, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.backends import dbconnection, dbtable
from django_isolatable.models import Fence

#: Vendors whose transaction goes on after a failed statement: a missing table is made when
#: the fence finds it missing. Others' (PostgreSQL's) would be aborted: it is looked for first,
#: once per process and database.
CONTINUING_VENDORS = ("sqlite", "mysql")
#: (alias, database NAME) whose fence table this process saw.
_ready: set[tuple[str, str]] = set()
_INSERT = "INSERT INTO {table} (name_hash, name, token, fenced_at) VALUES (%s, %s, %s, {now}) "


def upsert(vendor: str) -> str:
    """The statement that records a token (parameters: key, name, token), keeping the greater
    of it and the stored one; ``{table}`` and ``{now}`` to be filled in."""
    if vendor == "mysql":  # assignments run left to right, each seeing those before it
        return _INSERT + (
            "ON DUPLICATE KEY UPDATE fenced_at = IF(token <= VALUES(token), VALUES(fenced_at), "
            "fenced_at), token = GREATEST(token, VALUES(token))"
        )
    greatest = "max" if vendor == "sqlite" else "GREATEST"
    return _INSERT + (
        "ON CONFLICT (name_hash) DO UPDATE SET fenced_at = CASE WHEN {table}.token <= "
        "excluded.token THEN excluded.fenced_at ELSE {table}.fenced_at END, "
        f"token = {greatest}({{table}}.token, excluded.token)"
    )


def record(connection: BaseDatabaseWrapper, using: str, key: str, name: str, token: int) -> int:
    """Record ``token`` for the lock ``name`` (its row ``key``) in the current transaction of
    ``connection`` (alias ``using``): the token stored now, which is greater if another holder
    recorded a greater one. Raises ``LockIOError`` if the table is missing and cannot be made,
    the database's ``DatabaseError`` if the statement fails."""
    if connection.vendor not in CONTINUING_VENDORS:
        _ensure_table(connection, using)
    try:
        return _upsert(connection, key, name, token)
    except DatabaseError as e:
        _ready.discard(_database(connection, using))  # the table may have been dropped since
        if connection.vendor not in CONTINUING_VENDORS or not _table_missing(e):
            raise
    _make_table(connection, using)
    return _upsert(connection, key, name, token)


def _upsert(connection: BaseDatabaseWrapper, key: str, name: str, token: int) -> int:
    table = connection.ops.quote_name(Fence._meta.db_table)
    now, _, _ = dbtable.server_clock(connection.vendor, 0)
    sql = upsert(connection.vendor).format(table=table, now=now)
    params = [key, name.encode("utf-8", "backslashreplace").decode(), token]  # as dbtable.row
    features = connection.features
    with connection.cursor() as cursor:
        if features.can_return_columns_from_insert:
            cursor.execute(f"{sql} RETURNING token", params)
            return int(cursor.fetchone()[0])
        cursor.execute(sql, params)
        # A locking read sees the row as it is now, whatever the isolation level's snapshot.
        lock = " FOR UPDATE" if features.has_select_for_update else ""
        cursor.execute(f"SELECT token FROM {table} WHERE name_hash = %s{lock}", [key])
        return int(cursor.fetchone()[0])


def _table_missing(error: DatabaseError) -> bool:
    """SQLite's "no such table", MySQL's ER_NO_SUCH_TABLE."""
    cause = error.__cause__
    code = cause.args[0] if cause is not None and cause.args else None
    return code == 1146 or "no such table" in str(error)


def _database(connection: BaseDatabaseWrapper, using: str) -> tuple[str, str]:
    return (using, str(connection.settings_dict.get("NAME")))


def _ensure_table(connection: BaseDatabaseWrapper, using: str) -> None:
    """Make the fence table unless this process saw it in that database already."""
    database = _database(connection, using)
    if database not in _ready:
        _make_table(connection, using)
        _ready.add(database)


def _make_table(connection: BaseDatabaseWrapper, using: str) -> None:
    """Make the fence table unless it exists: SQLite's in the caller's transaction (gone again
    if that rolls back), others' on a connection of their own."""
    if connection.vendor == "sqlite":
        sql, params = connection.schema_editor().table_sql(Fence)
        with connection.cursor() as cursor:
            cursor.execute(sql.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1), params)
        return
    maker = connections.create_connection(using)
    try:
        dbconnection.ensure_table(maker, using, Fence, "fence table")
    finally:
        maker.close()
