"""The semaphore ability of the database strategy: a slot row per holder in the lock table,
beside the name's main row.

While a semaphore of N has holders, the name's main row (the row a plain lock holds) is the
semaphore's: it records N and never expires, so a plain lock of the name fails for as long as
it is there. Each holder has a slot row of its own, keyed by the main row's key and its token
(``dbtable.slot_key``) and pointing at the main row (``lock_hash``, indexed): released and
renewed as a plain lock's row is, its lease judged by the server's clock.

Every change to a semaphore's rows (taking a slot, releasing one, releasing them all) is one
transaction that first locks the main row (``SELECT ... FOR UPDATE``; on SQLite the file's
write lock, ``BEGIN IMMEDIATE``), then reads the slot rows at READ COMMITTED: each such
transaction sees every slot the ones before it made, so at most N are ever live, the count is
checked against N, and the last slot's release removes the main row with it. A process that
dies holding a slot leaves a row that expires at its TTL (or is released at once by a
same-host takeover); a slot taker removes expired ones, and the last release removes them all.

A slot taker first looks, writing nothing, so a full semaphore costs a waiter no transaction.
On SQLite, where a statement that writes runs alone, a slot of an existing semaphore is then
taken in one statement; the transaction decides everything else.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from django.db import DatabaseError, IntegrityError
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.backends import dbtable
from django_isolatable.backends.base import Lease, Semaphore, holder_count_mismatch
from django_isolatable.backends.dbconnection import (
    Contended,
    contended,
    run_statement,
    transaction,
)
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, new_token
from django_isolatable.models import Lock

if TYPE_CHECKING:
    from django_isolatable.backends.base import BackendOptions

Result = TypeVar("Result")
Run = Callable[..., Any]
#: A semaphore's main row expires only with its last slot (which removes it).
FOREVER = datetime(9999, 1, 1, tzinfo=timezone.utc)
#: Transactions tried before giving up on contention.
ATTEMPTS = 6
#: Vendors where a statement that writes runs alone from its first read to its end (SQLite's
#: write lock is the whole file's): a slot is usually taken in one statement there.
SERIAL_VENDORS = ("sqlite",)
#: Every row of a name: its main row and its slot rows.
EVERY_ROW = "WHERE name_hash = %s OR lock_hash = %s"


class Raced(Exception):
    """The name's main row was made after this transaction looked for it: try again."""


class TableSlots(Semaphore):
    """Mixin of the database strategy's backend: semaphores in its lock table."""

    if TYPE_CHECKING:
        options: BackendOptions
        alias: str
        strategy: ClassVar[str]

        def _connection(self) -> BaseDatabaseWrapper: ...

        def _now(self) -> tuple[str, str, Any]: ...

        def _execute(self, sql: str, params: list[Any], fetch: bool = False) -> Any: ...

    def _transaction(
        self, what: str, work: Callable[[Run], Result], single: bool = False
    ) -> Result:
        """``work(run)`` in one transaction (``single``: one statement, its own), tried again
        when it lost to concurrent ones (``Contended`` after ``ATTEMPTS``) or the table was
        missing or old (``LockIOError`` if that did not help)."""
        connection = self._connection()
        table = connection.ops.quote_name(Lock._meta.db_table)

        def run(sql: str, params: list[Any], fetch: bool = False) -> Any:
            return run_statement(connection, sql.format(table=table), params, fetch)

        for attempt in range(ATTEMPTS):
            try:
                if single:
                    return work(run)
                with transaction(connection):
                    return work(run)
            except (IntegrityError, Raced):  # another transaction made the main row first
                pass
            except DatabaseError as e:
                if not contended(e):
                    if attempt:
                        raise LockIOError(
                            f"Could not {what} in database {self.alias!r} "
                            f"({connection.vendor}): {e}"
                        ) from e
                    dbtable.ensure_table(connection, self.alias)  # it may have been missing
                    continue
            time.sleep(random.uniform(0.5, 1.0) * 0.005 * 2**attempt)
        raise Contended(f"Could not {what} in database {self.alias!r}: too much contention")

    def _lock_main_row(self, run: Run, main: str) -> bool:
        """Lock the name's main row for the rest of the transaction; False when there is none
        to lock (SQLite's transaction has the whole file's write lock already: True)."""
        if not self._connection().features.has_select_for_update:
            return True
        sql = "SELECT 1 FROM {table} WHERE name_hash = %s FOR UPDATE"
        return bool(run(sql, [main], fetch=True))

    def acquire_slot(self, name: str, info: LockInfo, max_holders: int) -> Lease | None:
        now, later, ttl = self._now()
        main = dbtable.name_hash(self.options.key_prefix, name)
        connection = self._connection()
        head_info = LockInfo(
            name=name, strategy=self.strategy, token=new_token(), mode="semaphore",
            max_holders=max_holders,
        )  # fmt: skip
        head = dbtable.row(connection, self.options.key_prefix, name, head_info)
        forever = connection.ops.adapt_datetimefield_value(dbtable.for_django(FOREVER))
        slot = dbtable.row(connection, self.options.key_prefix, name, info, slot_of=main)

        select = (
            "SELECT name_hash, mode, max_holders, lock_hash, "
            f"CASE WHEN expires_at < {now} THEN 1 ELSE 0 END FROM {{table}} {EVERY_ROW}"
        )

        def take(run: Run) -> bool:
            locked = self._lock_main_row(run, main)
            rows = run(select, [main, main], fetch=True)
            found = next((r for r in rows if r[0] == main), None)
            if found is not None and not locked:  # made since we looked: lock it, then read
                raise Raced
            slots = [r for r in rows if r[0] != main]
            live = sum(1 for r in slots if not r[4])
            fresh = found is None
            if found is not None and not dbtable.is_main_of_semaphore(found[1], found[3]):
                if not found[4]:  # a plain lock's live holder
                    raise holder_count_mismatch(name, found[2] or 1, max_holders)
                fresh = True  # its lease expired: take it over
            elif found is not None and (found[2] or 1) != max_holders:
                if live:
                    raise holder_count_mismatch(name, found[2] or 1, max_holders)
                fresh = True  # only expired slots of another count are left
            if fresh:
                if rows:
                    run(f"DELETE FROM {{table}} {EVERY_ROW}", [main, main])
                run(_insert("%s"), [*head, forever])
            elif live >= max_holders:
                return False
            elif live < len(slots):  # dead holders' expired slots
                run(f"DELETE FROM {{table}} WHERE lock_hash = %s AND expires_at < {now}", [main])
            run(_insert(later), [*slot, ttl])
            return True

        try:
            # A look first, which writes nothing: a full semaphore (what a waiter mostly
            # finds) costs no transaction, and no write lock on SQLite.
            rows = self._execute(select, [main, main], fetch=True)
            counted = _counted(rows, main, max_holders)
            if counted is not None and counted >= max_holders:
                return None
            if (
                counted is not None
                and connection.vendor in SERIAL_VENDORS
                and self._try_slot_in_one_statement(main, slot, later, ttl, now, max_holders)
            ):
                return Lease(name=name, token=info.token or "", info=info)
        except Contended:
            return None
        try:
            taken = self._transaction("take a semaphore slot", take)
        except Contended:
            return None
        return Lease(name=name, token=info.token or "", info=info) if taken else None

    def _try_slot_in_one_statement(
        self, main: str, slot: list[Any], later: str, ttl: Any, now: str, max_holders: int
    ) -> bool:
        """Where one statement runs alone, insert the slot row if the semaphore's main row of
        ``max_holders`` is there and fewer live slots than that: the usual take, in one
        statement. False: the transaction must decide (no main row, or full)."""

        def insert(run: Run) -> bool:
            values = ", ".join(["%s"] * (len(dbtable.COLUMNS) - 1) + [later])
            return bool(
                run(
                    f"INSERT INTO {{table}} ({', '.join(dbtable.COLUMNS)}) SELECT {values} "
                    "WHERE EXISTS (SELECT 1 FROM {table} WHERE name_hash = %s AND "
                    "mode = 'semaphore' AND lock_hash IS NULL AND max_holders = %s) AND "
                    "(SELECT COUNT(*) FROM {table} WHERE lock_hash = %s AND "
                    f"expires_at >= {now}) < %s",
                    [*slot, ttl, main, max_holders, main, max_holders],
                )
            )

        return self._transaction("take a semaphore slot", insert, single=True)

    def _release_slot(self, name: str, token: str) -> bool:
        """Release the slot ``token`` holds, and the semaphore's main row with the last live
        one; False if ``token`` holds no slot of ``name``."""
        now, _, _ = self._now()
        main = dbtable.name_hash(self.options.key_prefix, name)

        def release(run: Run) -> bool:
            locked = self._lock_main_row(run, main)
            sql = "DELETE FROM {table} WHERE name_hash = %s AND token = %s"
            if not run(sql, [dbtable.slot_key(main, token), token]):
                return False
            if not locked:  # no main row (a slot left without one): nothing more to remove
                return True
            sql = f"SELECT COUNT(*) FROM {{table}} WHERE lock_hash = %s AND expires_at >= {now}"
            if not run(sql, [main], fetch=True)[0][0]:
                run(
                    "DELETE FROM {table} WHERE lock_hash = %s OR (name_hash = %s AND "
                    "mode = 'semaphore' AND lock_hash IS NULL)",
                    [main, main],
                )
            return True

        return self._retried("release a semaphore slot", release)

    def _release_every_holder(self, name: str) -> bool:
        """Delete every row of ``name``: a plain lock's, or a semaphore's with all its slots."""
        main = dbtable.name_hash(self.options.key_prefix, name)

        def release(run: Run) -> bool:
            self._lock_main_row(run, main)
            return bool(run(f"DELETE FROM {{table}} {EVERY_ROW}", [main, main]))

        return self._retried("release a lock", release)

    def _retried(self, what: str, work: Callable[[Run], bool]) -> bool:
        try:
            return self._transaction(what, work)
        except Contended as e:
            raise LockIOError(str(e)) from e


def _counted(rows: list[Any], main: str, max_holders: int) -> int | None:
    """The live slots among ``rows`` (name_hash, mode, max_holders, lock_hash, expired) when
    they are those of a semaphore of ``max_holders``; None when there is something else to
    decide (no main row, a plain lock's, another count)."""
    found = next((r for r in rows if r[0] == main), None)
    if found is None or not dbtable.is_main_of_semaphore(found[1], found[3]):
        return None
    if (found[2] or 1) != max_holders:
        return None
    return sum(1 for r in rows if r[0] != main and not r[4])


def _insert(expires: str) -> str:
    """Insert a row (``IntegrityError`` if its key is taken); parameters: the ``row``, then
    those of ``expires``, the SQL of its expiry."""
    values = ", ".join(["%s"] * (len(dbtable.COLUMNS) - 1) + [expires])
    return f"INSERT INTO {{table}} ({', '.join(dbtable.COLUMNS)}) VALUES ({values})"
