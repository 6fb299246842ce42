"""Fencing tokens of the database and postgres strategies: a count per lock name in the table
``django_isolatable_fencing`` of their ``DATABASE_ALIAS`` database.

One statement issues a token: it raises the name's count by one and returns it, only if the
condition the strategy gives (the holder still holds its lock) is true when it runs. Two holders
that issue tokens one after the other get counts in that order: the second waits on the count's
row until the first statement committed. The table is created when missing, as the lock table
is; dropping it starts the counts again.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.backends.dbconnection import ensure_table
from django_isolatable.models import FencingCount

TABLE = FencingCount._meta.db_table
_ensured: set[tuple[str, str]] = set()


def statements(vendor: str, holds: str) -> tuple[str, str | None]:
    """The statement that counts a token while ``holds`` (SQL, its own parameters after the
    name's key and name) is true, returning it; and, where the first cannot return it (MySQL),
    the statement that reads it after."""
    columns = f"INSERT INTO {TABLE} (name_hash, name, token) SELECT %s, %s"
    if vendor == "mysql":  # LAST_INSERT_ID(x) keeps x for this connection's next read
        return (
            f"{columns}, LAST_INSERT_ID(1) FROM DUAL WHERE {holds} "
            "ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(token + 1)",
            "SELECT LAST_INSERT_ID()",
        )
    return (
        f"{columns}, 1 WHERE {holds} ON CONFLICT (name_hash) "
        f"DO UPDATE SET token = {TABLE}.token + 1 RETURNING token",
        None,
    )


def ensure(connection: BaseDatabaseWrapper, alias: str) -> None:
    """Create the table unless this process saw it already."""
    if (alias, connection.vendor) not in _ensured:
        ensure_table(connection, alias, FencingCount, "fencing tokens table")
        _ensured.add((alias, connection.vendor))


def issue(
    connection: BaseDatabaseWrapper, alias: str, key: str, name: str, holds: str, params: list[Any]
) -> int | None:
    """The next token of the name whose key is ``key``, on a connection in autocommit mode, if
    ``holds`` is true; else None."""
    ensure(connection, alias)
    count, read = statements(connection.vendor, holds)
    stored = name.encode("utf-8", "backslashreplace").decode()
    with connection.cursor() as cursor:
        cursor.execute(count, [key, stored, *params])
        if read is None:
            row = cursor.fetchone()
            return None if row is None else int(row[0])
        if cursor.rowcount <= 0:
            return None
        cursor.execute(read)
        row = cursor.fetchone()
    return None if row is None else int(row[0])
