"""The database strategy: a row per held lock in ``django_isolatable_lock``, any Django database.

Each thread talks to the database through a private connection of its own for the
``DATABASE_ALIAS`` settings, in autocommit mode: taking or releasing a lock never joins, commits
or rolls back the caller's transaction, and the caller's rollback never drops a lock. Expiry is
judged by the database server's clock; release and renewal go by owner token. The table is
created on first use when missing, so isolating ``migrate`` works on an empty database; two
processes racing to create it are both fine. The table's statements (each vendor's), its rows
and its creation are in ``backends/dbtable.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from django.core.checks import CheckMessage, Error
from django.db import DatabaseError, IntegrityError, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.backends import dbtable, tokentable
from django_isolatable.backends.base import Backend, BackendOptions, Fencing, Lease
from django_isolatable.backends.dbconnection import (
    Contended,
    close_private_connection,
    contended,
    private_connection,
    run_statement,
)
from django_isolatable.backends.dbslots import TableSlots
from django_isolatable.backends.periodtable import TablePeriods
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo
from django_isolatable.models import Lock


def _in_memory(name: str) -> bool:
    return name in ("", ":memory:") or "mode=memory" in name


class DatabaseBackend(Backend, TableSlots, Fencing, TablePeriods):
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
        return private_connection(self.alias)

    def _execute(self, sql: str, params: list[Any], fetch: bool = False) -> Any:
        """Run one statement on the private connection, creating the table if it is missing.

        Raises ``Contended`` when the database gave up on the statement because of concurrent
        statements (a deadlock, a busy SQLite file), ``LockIOError`` on other failures.
        """
        connection = self._connection()
        sql = sql.format(table=connection.ops.quote_name(Lock._meta.db_table))
        for attempt in range(2):
            try:
                return run_statement(connection, sql, params, fetch)
            except IntegrityError:
                raise
            except DatabaseError as e:
                if contended(e):
                    raise Contended(str(e)) from e
                if attempt:
                    raise LockIOError(
                        f"The lock table of database {self.alias!r} ({connection.vendor}) "
                        f"failed: {e}"
                    ) from e
                # then try once more: the table may have been missing
                dbtable.ensure_table(connection, self.alias)
        raise AssertionError("unreachable")

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
        return dbtable.server_clock(self._connection().vendor, self.options.ttl)

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        now, later, ttl = self._now()
        connection = self._connection()
        row = dbtable.row(connection, self.options.key_prefix, name, info)
        try:
            taken = self._take(connection.vendor, row, now, later, ttl)
        except Contended:  # the database aborted us in favour of a concurrent statement
            return None
        return Lease(name=name, token=info.token or "", info=info) if taken == 1 else None

    def _take(self, vendor: str, row: list[Any], now: str, later: str, ttl: Any) -> int:
        """Insert the row, or take over an expired one; the number of rows taken (0 or 1)."""
        if vendor in dbtable.UPSERT_VENDORS:
            return int(self._execute(dbtable.upsert(now, later), [*row, ttl]))
        try:
            taken = self._execute(dbtable.insert(vendor, later), [*row, ttl])
        except IntegrityError:
            taken = 0
        if not taken:  # there is a row: take it over if it expired
            taken = self._execute(dbtable.take_over(now, later), [*row[1:], ttl, row[0]])
        return int(taken)

    def release(self, lease: Lease) -> bool:
        if lease.pid != os.getpid():
            return False  # a forked child's copy: the lock is its parent's
        if lease.info.mode == "semaphore":
            return self._release_slot(lease.name, lease.token)
        name_hash = dbtable.name_hash(self.options.key_prefix, lease.name)
        sql = "DELETE FROM {table} WHERE name_hash = %s AND token = %s"
        return bool(self._retrying("release a lock", sql, [name_hash, lease.token]))

    def refresh(self, lease: Lease, ttl: float) -> bool:
        now, later, param = self._now()
        name_hash = dbtable.name_hash(self.options.key_prefix, lease.name)
        if lease.info.mode == "semaphore":  # a slot row, renewed as a plain lock's row
            name_hash = dbtable.slot_key(name_hash, lease.token)
        sql = (
            f"UPDATE {{table}} SET expires_at = {later} "
            f"WHERE name_hash = %s AND token = %s AND expires_at >= {now}"
        )
        return bool(self._retrying("renew a lease", sql, [param, name_hash, lease.token]))

    def fencing_token(self, lease: Lease) -> int | None:
        """The name's next count in ``tokentable``, while the lease's row is still its own and
        unexpired by the server's clock."""
        now, _, _ = self._now()
        key = dbtable.name_hash(self.options.key_prefix, lease.name)
        row_key = dbtable.slot_key(key, lease.token) if lease.info.mode == "semaphore" else key
        connection = self._connection()
        table = connection.ops.quote_name(Lock._meta.db_table)
        holds = (
            f"EXISTS (SELECT 1 FROM {table} WHERE name_hash = %s AND token = %s "
            f"AND expires_at >= {now})"
        )
        for attempt in range(5):
            try:
                params = [row_key, lease.token]
                token = tokentable.issue(connection, self.alias, key, lease.name, holds, params)
                break
            except DatabaseError as e:
                if not contended(e) or attempt == 4:
                    raise LockIOError(
                        f"Could not issue a fencing token for {lease.name!r} in database "
                        f"{self.alias!r}: {e}"
                    ) from e
                time.sleep(0.01 * 2**attempt)
        if token is not None:  # the holder's row shows it too, for `locks status`
            sql = "UPDATE {table} SET fencing_token = %s WHERE name_hash = %s AND token = %s"
            self._retrying("record a fencing token", sql, [token, row_key, lease.token])
        return token

    def _records(
        self, where: str, params: list[Any], name: str | None = None
    ) -> Iterator[LockInfo]:
        """The rows ``where`` picks, as records (see ``dbtable.record``)."""
        now, _, _ = self._now()
        for values in self._execute(dbtable.select(now, where), params, fetch=True):
            info = dbtable.record(values, self.strategy, self.options.key_prefix, name)
            if info is not None:
                yield info

    def inspect(self, name: str) -> list[LockInfo]:
        name_hash = dbtable.name_hash(self.options.key_prefix, name)
        where = "WHERE name_hash = %s OR lock_hash = %s"  # its main row and its slot rows
        return list(self._records(where, [name_hash, name_hash], name))

    def list(self) -> Iterator[LockInfo]:
        return self._records("ORDER BY name", [])

    def force_release(self, name: str, token: str | None = None) -> bool:
        if token is None:
            return self._release_every_holder(name)
        # One statement: a holder that took the row since it was judged keeps it.
        name_hash = dbtable.name_hash(self.options.key_prefix, name)
        sql = "DELETE FROM {table} WHERE name_hash = %s AND token = %s"
        if self._retrying("release a lock", sql, [name_hash, token]):
            return True
        return self._release_slot(name, token)

    def close(self) -> None:
        close_private_connection(self.alias)
