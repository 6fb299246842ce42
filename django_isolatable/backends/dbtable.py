"""The database strategy's table: each vendor's statements on it, a holder record as its row and
its row as a record, and creating it when it is missing.

Expiry is judged by the database server's clock. Taking a lock is one statement that inserts
the row or takes over an expired one (``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` on
PostgreSQL and SQLite; ``INSERT IGNORE`` then a conditional ``UPDATE`` on MySQL/MariaDB). SQL
here names the table ``{table}``; the backend fills in the quoted name and runs it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.backends import dbconnection
from django_isolatable.holders import LockInfo
from django_isolatable.models import Lock

COLUMNS = [str(field.column) for field in Lock._meta.concrete_fields]
#: The server's "now", and "now plus %s" (seconds as the vendor wants them), per vendor.
NOW = {
    "postgresql": ("CURRENT_TIMESTAMP", "CURRENT_TIMESTAMP + make_interval(secs => %s)"),
    "mysql": ("UTC_TIMESTAMP(6)", "UTC_TIMESTAMP(6) + INTERVAL %s MICROSECOND"),
    "sqlite": (
        "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')",
        "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', %s)",
    ),
}
#: Vendors that take a lock in one statement (``upsert``); the others ``insert``, then
#: ``take_over``.
UPSERT_VENDORS = ("postgresql", "sqlite")


def name_hash(prefix: str, name: str) -> str:
    """The row's key: SHA-256 of the name, after KEY_PREFIX and a NUL when there is a prefix.

    Names never hold NUL, so the last NUL ends the prefix: no two (prefix, name) pairs share a
    key, as "P:ns:" + "job" and "P:" + "ns:job" would if they were only joined. Without a prefix
    the key is the name's own hash, as it was before prefixes were kept apart.
    """
    key = f"{prefix}\0{name}" if prefix else name
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def server_clock(vendor: str, ttl: float) -> tuple[str, str, Any]:
    """(now SQL, now-plus-TTL SQL, the TTL parameter) for ``vendor``."""
    current, later = NOW.get(vendor, NOW["postgresql"])
    param: Any = {"mysql": int(ttl * 1_000_000), "sqlite": f"+{ttl:.6f} seconds"}.get(vendor, ttl)
    return current, later, param


def row(
    connection: BaseDatabaseWrapper,
    prefix: str,
    name: str,
    info: LockInfo,
    slot_of: str | None = None,
) -> list[Any]:
    """The values of ``COLUMNS`` but ``expires_at`` for ``info``'s lock on ``name``: its main
    row, or (``slot_of``, the main row's key) a semaphore's slot row, keyed by ``slot_key``."""
    ops = connection.ops
    return [
        name_hash(prefix, name) if slot_of is None else slot_key(slot_of, info.token or ""),
        # Text columns take UTF-8 only: a name with lone surrogates is stored with them
        # escaped (its hash, the key, is exact; such a lock is not listed by `locks status`).
        name.encode("utf-8", "backslashreplace").decode(),
        info.token,
        info.pid,
        (info.hostname or "")[:255],
        (info.host_id or "")[:255],
        ops.adapt_datetimefield_value(for_django(info.process_started_at)),
        ops.adapt_datetimefield_value(for_django(info.acquired_at)),
        json.dumps(list(info.argv)),
        info.label,
        info.mode,
        info.max_holders,
        slot_of,
        info.fencing_token,
    ]


def slot_key(main_key: str, token: str) -> str:
    """A semaphore slot row's key: SHA-256 of its main row's key and its holder's token, so
    release and renewal find it by primary key, as a plain lock's row."""
    return hashlib.sha256(f"{main_key}\0{token}".encode("utf-8", "surrogatepass")).hexdigest()


def upsert(now: str, later: str) -> str:
    """Insert the row or take over an expired one, in one statement; parameters: the ``row``,
    then the TTL."""
    columns = ", ".join(COLUMNS)
    values = ", ".join(["%s"] * (len(COLUMNS) - 1) + [later])
    updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
    return (
        f"INSERT INTO {{table}} ({columns}) VALUES ({values}) ON CONFLICT (name_hash) "
        f"DO UPDATE SET {updates} WHERE {{table}}.expires_at < {now}"
    )


def insert(vendor: str, later: str) -> str:
    """Insert the row if there is none (MySQL quietly, others raising ``IntegrityError``);
    parameters: the ``row``, then the TTL."""
    columns = ", ".join(COLUMNS)
    values = ", ".join(["%s"] * (len(COLUMNS) - 1) + [later])
    verb = "INSERT IGNORE INTO" if vendor == "mysql" else "INSERT INTO"
    return f"{verb} {{table}} ({columns}) VALUES ({values})"


def take_over(now: str, later: str) -> str:
    """Take over the row if it expired; parameters: the ``row`` but its key, the TTL, the key."""
    updates = ", ".join(f"{c} = %s" for c in COLUMNS[1:-1])
    return (
        f"UPDATE {{table}} SET {updates}, expires_at = {later} "
        f"WHERE name_hash = %s AND expires_at < {now}"
    )


def select(now: str, where: str) -> str:
    """The rows ``where`` picks, in the shape ``record`` reads."""
    started, acquired, expires = (
        _readable(c) for c in ("process_started_at", "acquired_at", "expires_at")
    )
    return (
        f"SELECT name_hash, name, token, pid, hostname, host_id, {started}, {acquired}, "
        f"argv, label, mode, max_holders, lock_hash, fencing_token, {expires}, "
        f"CASE WHEN expires_at < {now} THEN 1 ELSE 0 END FROM {{table}} {where}"
    )


def is_main_of_semaphore(mode: object, slot_of: object) -> bool:
    """A semaphore's main row: it holds the name while the semaphore has slot rows, and is no
    holder itself."""
    return mode == "semaphore" and slot_of is None


def record(values: Any, strategy: str, prefix: str, name: str | None) -> LockInfo | None:
    """The record a row from ``select`` holds, for ``strategy``'s lock ``name``; None for a
    semaphore's main row (no holder).

    Without ``name`` (listing), None for a row whose stored name does not hash to its key:
    another KEY_PREFIX's, or a name the connection's character set could not carry (MySQL's
    3-byte "utf8" on Django < 5.2 loses emoji; use utf8mb4).
    """
    key, stored, token, pid, hostname, host_id, started, acquired, argv, label = values[:10]
    mode, max_holders, slot_of, fencing_token, expires, expired = values[10:16]
    if is_main_of_semaphore(mode, slot_of):
        return None
    if name is None and (slot_of or key) != name_hash(prefix, stored):
        return None
    return LockInfo(
        name=stored if name is None else name,
        strategy=strategy,
        token=token,
        pid=pid,
        hostname=hostname or None,
        host_id=host_id or None,
        process_started_at=_datetime(started),
        acquired_at=_datetime(acquired),
        argv=_argv(argv),
        label=label if isinstance(label, str) else None,
        mode=mode if mode in ("exclusive", "semaphore") else "exclusive",
        max_holders=max_holders if isinstance(max_holders, int) and max_holders > 0 else 1,
        expires_at=_datetime(expires),
        fencing_token=fencing_token
        if isinstance(fencing_token, int) and fencing_token > 0
        else None,
        alive=False if expired else None,  # an expired lease is stale, whoever held it
    )


def ensure_table(connection: BaseDatabaseWrapper, alias: str) -> None:
    """Create the lock table unless it exists (and add the columns an earlier version's lacks);
    fine when another process races to it. Raises ``LockIOError`` if the database is
    unreachable or the table cannot be made."""
    if dbconnection.ensure_table(connection, alias, Lock, "lock table"):
        _add_missing_columns(connection)


def _add_missing_columns(connection: BaseDatabaseWrapper) -> None:
    """Add the columns a table made by an earlier version lacks (``label``; ``mode``,
    ``max_holders`` and ``lock_hash``, indexed; ``fencing_token``); all nullable, so its rows
    stay valid. Another process adding one first is fine."""
    with connection.cursor() as cursor:
        table = connection.introspection.get_table_description(cursor, Lock._meta.db_table)
    present = {column.name for column in table}
    for field in Lock._meta.concrete_fields:
        if field.column not in present:
            try:
                with connection.schema_editor() as editor:
                    editor.add_field(Lock, field)
            except DatabaseError:
                with connection.cursor() as cursor:
                    table = connection.introspection.get_table_description(
                        cursor, Lock._meta.db_table
                    )
                if field.column not in {column.name for column in table}:
                    raise


def for_django(value: datetime | None) -> datetime | None:
    """Aware UTC as Django stores it: naive UTC when USE_TZ is off (read back as UTC)."""
    if value is None or settings.USE_TZ:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def _datetime(value: object) -> datetime | None:
    """A stored time as aware UTC (naive ones are UTC); None for what is no time datetime can
    hold, so a row written by hand never breaks reading the others."""
    try:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None


def _readable(column: str) -> str:
    """SQL for a time column that is NULL where no ``datetime`` can hold the time (a row written
    by hand): drivers raise on such a value, and one would make the whole table unreadable."""
    return f"CASE WHEN {column} BETWEEN '0001-01-02' AND '9999-12-30' THEN {column} END"


def _argv(value: object) -> tuple[str, ...]:
    """The stored JSON list of the command line; () for anything else."""
    try:
        argv = json.loads(value) if isinstance(value, (str, bytes)) else None
    except (ValueError, RecursionError):
        return ()
    return tuple(a for a in argv if isinstance(a, str)) if isinstance(argv, list) else ()
