"""The database strategy: a row per held lock in ``django_isolatable_lock``, any Django database.

Each thread talks to the database through a private connection of its own for the
``DATABASE_ALIAS`` settings, in autocommit mode: taking or releasing a lock never joins, commits
or rolls back the caller's transaction, and the caller's rollback never drops a lock. Expiry is
judged by the database server's clock. Acquiring is one statement that inserts the row or takes
over an expired one (``INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`` on PostgreSQL and
SQLite; ``INSERT IGNORE`` then a conditional ``UPDATE`` on MySQL/MariaDB); release and renewal
go by owner token. The table is created on first use when missing, so isolating ``migrate`` works
on an empty database; two processes racing to create it are both fine.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any, ClassVar

from django.conf import settings
from django.core.checks import CheckMessage, Error
from django.db import DatabaseError, IntegrityError, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.backends.base import Backend, BackendOptions, Lease
from django_isolatable.errors import LockIOError
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
UPSERT_VENDORS = ("postgresql", "sqlite")

_local = threading.local()
_abandoned: list[Any] = []


def _forget_after_fork() -> None:
    # Never close the parent's sockets from the child; keep them unreachable instead.
    _abandoned.append(getattr(_local, "__dict__", {}).copy())
    _local.__dict__.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _name_hash(prefix: str, name: str) -> str:
    """The row's key: SHA-256 of the name, after KEY_PREFIX and a NUL when there is a prefix.

    Names never hold NUL, so the last NUL ends the prefix: no two (prefix, name) pairs share a
    key, as "P:ns:" + "job" and "P:" + "ns:job" would if they were only joined. Without a prefix
    the key is the name's own hash, as it was before prefixes were kept apart.
    """
    key = f"{prefix}\0{name}" if prefix else name
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _for_django(value: datetime | None) -> datetime | None:
    """Aware UTC as Django stores it: naive UTC when USE_TZ is off (read back as UTC)."""
    if value is None or settings.USE_TZ:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


class Contended(Exception):
    """The database gave up on a statement because of concurrent ones; trying again is fine."""


#: MySQL/MariaDB: deadlock, lock wait timeout. SQLite: another connection is writing.
_CONTENTION_CODES = (1213, 1205)


def _contended(error: DatabaseError) -> bool:
    cause = error.__cause__
    code = cause.args[0] if cause is not None and cause.args else None
    return code in _CONTENTION_CODES or "database is locked" in str(error)


def _in_memory(name: str) -> bool:
    return name in ("", ":memory:") or "mode=memory" in name


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


class DatabaseBackend(Backend):
    strategy: ClassVar[str] = "database"
    expiring: ClassVar[bool] = True
    heartbeat: ClassVar[bool] = True
    poll_interval: ClassVar[float] = 0.04

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.alias = options.database_alias
        if self.alias not in connections.settings:
            raise LockIOError(f"Database alias {self.alias!r} is not in settings.DATABASES.")

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        alias = options.database_alias
        setting = f'settings.ISOLATABLE["DATABASE_ALIAS"] is {alias!r}, which'
        if alias not in connections.settings:
            return [Error(f"{setting} is not in settings.DATABASES.", id="isolatable.E040")]
        database = connections.settings[alias]
        if "sqlite" in database.get("ENGINE", "") and _in_memory(str(database.get("NAME", ""))):
            return [
                Error(
                    f"{setting} is an in-memory SQLite database: every connection has its own, "
                    "so its locks exclude nothing. Use a database file.",
                    id="isolatable.E041",
                )
            ]
        return []

    def _connection(self) -> BaseDatabaseWrapper:
        wrappers: dict[str, BaseDatabaseWrapper] = _local.__dict__.setdefault("wrappers", {})
        if self.alias not in wrappers:
            wrappers[self.alias] = connections.create_connection(self.alias)
        return wrappers[self.alias]

    def _execute(self, sql: str, params: list[Any], fetch: bool = False) -> Any:
        """Run one statement on the private connection, creating the table if it is missing.

        Raises ``Contended`` when the database gave up on the statement because of concurrent
        statements (a deadlock, a busy SQLite file), ``LockIOError`` on other failures.
        """
        connection = self._connection()
        sql = sql.format(table=connection.ops.quote_name(Lock._meta.db_table))
        for attempt in range(2):
            try:
                with connection.cursor() as cursor:
                    cursor.execute(sql, params)
                    return cursor.fetchall() if fetch else cursor.rowcount
            except IntegrityError:
                raise
            except DatabaseError as e:
                if _contended(e):
                    raise Contended(str(e)) from e
                if attempt:
                    raise LockIOError(
                        f"The lock table of database {self.alias!r} ({connection.vendor}) "
                        f"failed: {e}"
                    ) from e
                self._ensure_table(connection)  # then try once more: it may have been missing
        raise AssertionError("unreachable")

    def _ensure_table(self, connection: BaseDatabaseWrapper) -> None:
        """Create the lock table unless it exists; fine when another process races to it."""
        try:
            if Lock._meta.db_table in connection.introspection.table_names():
                return
            with connection.schema_editor() as editor:
                editor.create_model(Lock)
        except DatabaseError as e:  # another process created it first, or the database is down
            try:
                exists = Lock._meta.db_table in connection.introspection.table_names()
            except DatabaseError:
                raise LockIOError(f"Database {self.alias!r} is unreachable: {e}") from e
            if not exists:
                raise LockIOError(f"Could not create the lock table in {self.alias!r}: {e}") from e

    def _retrying(self, what: str, sql: str, params: list[Any]) -> Any:
        """``_execute`` for statements that must not be lost to contention (release, renew)."""
        for attempt in range(5):
            try:
                return self._execute(sql, params)
            except Contended as e:
                if attempt == 4:
                    raise LockIOError(f"Could not {what} in database {self.alias!r}: {e}") from e
                time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    def _now(self) -> tuple[str, str, Any]:
        """(now SQL, now-plus-TTL SQL, the TTL parameter) for this database."""
        vendor = self._connection().vendor
        now, later = NOW.get(vendor, NOW["postgresql"])
        ttl = self.options.ttl
        param: Any = {"mysql": int(ttl * 1_000_000), "sqlite": f"+{ttl:.6f} seconds"}.get(
            vendor, ttl
        )
        return now, later, param

    def _row(self, name: str, info: LockInfo) -> list[Any]:
        ops = self._connection().ops
        return [
            _name_hash(self.options.key_prefix, name),
            # Text columns take UTF-8 only: a name with lone surrogates is stored with them
            # escaped (its hash, the key, is exact; such a lock is not listed by `locks status`).
            name.encode("utf-8", "backslashreplace").decode(),
            info.token,
            info.pid,
            (info.hostname or "")[:255],
            (info.host_id or "")[:255],
            ops.adapt_datetimefield_value(_for_django(info.process_started_at)),
            ops.adapt_datetimefield_value(_for_django(info.acquired_at)),
            json.dumps(list(info.argv)),
        ]

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        now, later, ttl = self._now()
        row = self._row(name, info)
        vendor = self._connection().vendor
        try:
            taken = self._take(vendor, row, now, later, ttl)
        except Contended:  # the database aborted us in favour of a concurrent statement
            return None
        return Lease(name=name, token=info.token or "", info=info) if taken == 1 else None

    def _take(self, vendor: str, row: list[Any], now: str, later: str, ttl: Any) -> int:
        """Insert the row, or take over an expired one; the number of rows taken (0 or 1)."""
        columns = ", ".join(COLUMNS)
        values = ", ".join(["%s"] * len(row) + [later])
        if vendor in UPSERT_VENDORS:
            updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
            taken = self._execute(
                f"INSERT INTO {{table}} ({columns}) VALUES ({values}) ON CONFLICT (name_hash) "
                f"DO UPDATE SET {updates} WHERE {{table}}.expires_at < {now}",
                [*row, ttl],
            )
        else:
            insert = "INSERT IGNORE INTO" if vendor == "mysql" else "INSERT INTO"
            try:
                taken = self._execute(
                    f"{insert} {{table}} ({columns}) VALUES ({values})", [*row, ttl]
                )
            except IntegrityError:
                taken = 0
            if not taken:  # there is a row: take it over if it expired
                updates = ", ".join(f"{c} = %s" for c in COLUMNS[1:-1])
                taken = self._execute(
                    f"UPDATE {{table}} SET {updates}, expires_at = {later} "
                    f"WHERE name_hash = %s AND expires_at < {now}",
                    [*row[1:], ttl, row[0]],
                )
        return int(taken)

    def release(self, lease: Lease) -> bool:
        if lease.pid != os.getpid():
            return False  # a forked child's copy: the lock is its parent's
        name_hash = _name_hash(self.options.key_prefix, lease.name)
        sql = "DELETE FROM {table} WHERE name_hash = %s AND token = %s"
        return bool(self._retrying("release a lock", sql, [name_hash, lease.token]))

    def refresh(self, lease: Lease, ttl: float) -> bool:
        now, later, param = self._now()
        name_hash = _name_hash(self.options.key_prefix, lease.name)
        sql = (
            f"UPDATE {{table}} SET expires_at = {later} "
            f"WHERE name_hash = %s AND token = %s AND expires_at >= {now}"
        )
        return bool(self._retrying("renew a lease", sql, [param, name_hash, lease.token]))

    def _records(
        self, where: str, params: list[Any], name: str | None = None
    ) -> Iterator[LockInfo]:
        """Rows as records. Without ``name`` (listing), rows whose stored name does not hash to
        their key are skipped: another KEY_PREFIX's, or a name the connection's character set
        could not carry (MySQL's 3-byte "utf8" on Django < 5.2 loses emoji; use utf8mb4)."""
        now, _, _ = self._now()
        started, acquired, expires = (
            _readable(c) for c in ("process_started_at", "acquired_at", "expires_at")
        )
        sql = (
            f"SELECT name_hash, name, token, pid, hostname, host_id, {started}, {acquired}, "
            f"argv, {expires}, CASE WHEN expires_at < {now} THEN 1 ELSE 0 END "
            f"FROM {{table}} {where}"
        )
        for row in self._execute(sql, params, fetch=True):
            name_hash, stored, token, pid, hostname, host_id, started, acquired, argv = row[:9]
            if name is None and name_hash != _name_hash(self.options.key_prefix, stored):
                continue
            yield LockInfo(
                name=stored if name is None else name,
                strategy=self.strategy,
                token=token,
                pid=pid,
                hostname=hostname or None,
                host_id=host_id or None,
                process_started_at=_datetime(started),
                acquired_at=_datetime(acquired),
                expires_at=_datetime(row[9]),
                argv=_argv(argv),
                alive=False if row[10] else None,  # an expired lease is stale, whoever held it
            )

    def inspect(self, name: str) -> LockInfo | None:
        name_hash = _name_hash(self.options.key_prefix, name)
        return next(self._records("WHERE name_hash = %s", [name_hash], name), None)

    def list(self) -> Iterator[LockInfo]:
        return self._records("ORDER BY name", [])

    def force_release(self, name: str, token: str | None = None) -> bool:
        name_hash = _name_hash(self.options.key_prefix, name)
        if token is None:
            sql, params = "DELETE FROM {table} WHERE name_hash = %s", [name_hash]
        else:  # one statement: a holder that took the row since it was judged keeps it
            sql, params = (
                "DELETE FROM {table} WHERE name_hash = %s AND token = %s",
                [name_hash, token],
            )
        return bool(self._retrying("release a lock", sql, params))

    def close(self) -> None:
        wrappers: dict[str, BaseDatabaseWrapper] = _local.__dict__.get("wrappers", {})
        connection = wrappers.pop(self.alias, None)
        if connection is not None:
            connection.close()
