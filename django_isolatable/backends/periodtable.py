"""The periods ability (``once_per``) of the database and postgres strategies: a row per name,
period length and period in ``django_isolatable_period``, on the ``DATABASE_ALIAS`` database,
counted on the database server's clock.

The table is created when it is missing, as the lock table is (two processes racing to create
it are both fine), so ``once_per`` works on an empty database. Rows are written and read
through a private connection per thread in autocommit mode, never the caller's transaction: a
caller's rollback never undoes a recorded run. Recording a run also deletes the rows whose
period ended (plus a margin) by the server's clock, so the table holds about one row per name.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from django.db import DatabaseError, IntegrityError
from django.db.backends.base.base import BaseDatabaseWrapper

from django_isolatable.backends import dbtable
from django_isolatable.backends.base import Periods, period_ends
from django_isolatable.backends.dbconnection import (
    contended,
    ensure_table,
    private_connection,
    run_statement,
)
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo
from django_isolatable.models import PeriodRun

if TYPE_CHECKING:
    from django_isolatable.backends.base import BackendOptions

#: Seconds since the Unix epoch on the server's clock, per vendor (others: PostgreSQL's).
EPOCH_NOW = {
    "postgresql": "SELECT EXTRACT(EPOCH FROM clock_timestamp())",
    "mysql": "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))",
    "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0",
}
#: MySQL reports microseconds (its division would round to its own precision).
EPOCH_UNIT = {"mysql": 1e-6}
COLUMNS = "period_key, name, period_seconds, period_index, record, expires_at"


class TablePeriods(Periods):
    """Mixin of the database and postgres strategies' backends: ``once_per`` records in a
    table of their ``DATABASE_ALIAS`` database."""

    if TYPE_CHECKING:
        options: BackendOptions
        strategy: ClassVar[str]

    def _period_connection(self) -> BaseDatabaseWrapper:
        return private_connection(self.options.database_alias)

    def _run(
        self, what: str, sql: str, params: list[Any], *, fetch: bool = False, create: bool = True
    ) -> Any:
        """Run one statement (``{table}`` filled in), retrying a few times under contention
        and, if it fails otherwise, once more after creating the table (it may be missing)
        unless not to ``create``. Raises ``LockIOError`` and, for a duplicate key,
        ``IntegrityError``."""
        connection = self._period_connection()
        sql = sql.format(table=connection.ops.quote_name(PeriodRun._meta.db_table))
        created = False
        for attempt in range(6):
            try:
                return run_statement(connection, sql, params, fetch)
            except IntegrityError:
                raise
            except DatabaseError as e:
                if contended(e) and attempt < 5:
                    time.sleep(0.01 * 2**attempt)
                    continue
                if created or not create or contended(e):
                    raise LockIOError(
                        f"Could not {what} in database {self.options.database_alias!r} "
                        f"({connection.vendor}): {e}"
                    ) from e
                ensure_table(connection, self.options.database_alias, PeriodRun, "periods table")
                created = True
        raise AssertionError("unreachable")

    def store_time(self) -> float:
        vendor = self._period_connection().vendor
        sql = EPOCH_NOW.get(vendor, EPOCH_NOW["postgresql"])
        ((seconds,),) = self._run("read the time", sql, [], fetch=True, create=False)
        return float(seconds) * EPOCH_UNIT.get(vendor, 1.0)

    def _period_key(self, name: str, period_seconds: float, period_index: int) -> str:
        # Only the prefix may hold a NUL, so the parts are told apart from the right.
        key = f"{self.options.key_prefix}\0{name}\0{float(period_seconds)!r}\0{period_index}"
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def ran_in(self, name: str, period_seconds: float, period_index: int) -> LockInfo | None:
        key = self._period_key(name, period_seconds, period_index)
        sql = "SELECT record FROM {table} WHERE period_key = %s"
        rows = self._run("read a run", sql, [key], fetch=True)
        return LockInfo.from_json(name, self.strategy, rows[0][0]) if rows else None

    def record_run(
        self, name: str, period_seconds: float, period_index: int, info: LockInfo
    ) -> None:
        connection = self._period_connection()
        now, _, _ = dbtable.server_clock(connection.vendor, 0)
        # The periods that are over, of every name: best effort, it keeps the table small.
        with contextlib.suppress(LockIOError):
            sql = f"DELETE FROM {{table}} WHERE expires_at < {now}"
            self._run("clear old runs", sql, [], create=False)
        ends = datetime.fromtimestamp(period_ends(period_seconds, period_index), timezone.utc)
        params = [
            self._period_key(name, period_seconds, period_index),
            name.encode("utf-8", "backslashreplace").decode(),
            float(period_seconds),
            int(period_index),
            info.to_json(),
            connection.ops.adapt_datetimefield_value(dbtable.for_django(ends)),
        ]
        sql = f"INSERT INTO {{table}} ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)"
        # A duplicate key: recorded already, by a holder that ran while the lock was
        # force-released.
        with contextlib.suppress(IntegrityError):
            self._run("record a run", sql, params)
