"""The postgres strategy: session advisory locks on dedicated connections (``pgsession``).

Each held lock keeps a connection of its own, so Django closing or rolling back its connection
never drops a lock. Every operation is one statement, prepared by psycopg once a connection ran
it a few times. The holder's record is in what ``pg_stat_activity`` shows of the holding session,
where ``locks status`` reads it: its process fields as a comment that opens the statements the
holder runs, the owner token and time taken as its ``application_name`` (``isolatable <token>
<µs>``). Waiters queue on the server (``pg_advisory_lock`` under a ``lock_timeout``).
Semaphore slots and shared holds hold the name's lock shared, plus what ``pgholders`` says.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_isolatable.backends import dbtable, tokentable
from django_isolatable.backends.base import (
    Backend,
    BackendOptions,
    Fencing,
    Lease,
    Semaphore,
    Shared,
    Waiting,
    missing_driver,
)
from django_isolatable.backends.dbconnection import private_connection
from django_isolatable.backends.periodtable import TablePeriods
from django_isolatable.backends.pgholders import (
    HOLD,
    HOLDERS,
    ONE_NAME,
    OTHER_COUNT,
    TERMINATE,
    UNLOCK_HELD,
    advisory_key,
    hold_parameters,
    lock_ids,
    mismatch,
    read_record,
    record_comment,
    session_label,
)
from django_isolatable.backends.pgsession import (
    HELD_ALREADY,
    IDLE_LABEL,
    Sessions,
    pooled,
)
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, replace_token, this_pid

if TYPE_CHECKING:
    from psycopg import Connection

_LONGEST_WAIT = 2**31 - 1  # milliseconds: the largest lock_timeout

# One statement per operation (see HELD_ALREADY).
_TRY = (  # %s: the key, the label
    f"SELECT CASE {HELD_ALREADY} WHEN pg_try_advisory_lock(%s) "
    "THEN set_config('application_name', %s, false) ELSE '' END"
)
_WAIT = (  # %s: lock_timeout (ms, for this statement only), the key, the label
    f"SELECT CASE {HELD_ALREADY} WHEN set_config('lock_timeout', %s, true) IS NULL THEN NULL "
    "WHEN pg_advisory_lock(%s)::text = '' THEN set_config('application_name', %s, false) END"
)
_HELD = (  # %s: pg_locks (classid, objid)
    "FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
    "AND pid = pg_backend_pid() AND classid::bigint = %s AND objid::bigint = %s"
)
_HOLDS = f"SELECT count(*) {_HELD}"
_CLAIM = f"SELECT set_config('application_name', %s, false) {_HELD}"  # %s: the label first
_UNLOCK = f"SELECT pg_advisory_unlock(%s), set_config('application_name', '{IDLE_LABEL}', false)"


class _Named(NamedTuple):
    """What every lock of one name and kind in one process uses, made once."""

    key: Any  # the key as psycopg's Int8, so its statements always have one parameter type
    ids: tuple[Any, Any]
    try_lock: str  # for a shared or slot hold, its statement (pgholders)
    wait: str
    holds: str  # the renewal thread's check keeps the record shown
    unlock: str
    hold: dict[str, Any]  # a shared or slot hold's parameters but its label (pgholders)
    fence: str  # issues a fencing token while the session holds the lock (tokentable)


def _named(prefix: str, name: str, info: LockInfo) -> _Named:
    """``name``'s key and statements, with the record of ``info``'s process and kind."""
    process = (info.pid, info.hostname, info.host_id, info.process_started_at, info.argv)
    held = (info.mode, info.max_holders)
    return _statements(prefix, name, process, info.label, held, info.fencing_token)


@functools.lru_cache(maxsize=1024)
def _statements(
    prefix: str, name: str, process: Any, label: str | None, held: Any, fenced: int | None
) -> _Named:
    from psycopg.types.numeric import Int8

    key = advisory_key(prefix, name)
    opening = record_comment(name, process, label, held, fenced)
    classid, objid = lock_ids(key)
    ids = (Int8(classid), Int8(objid))
    key8 = Int8(key)
    statements = (opening + HOLD.get(held[0], _TRY), opening + _WAIT, opening + _HOLDS)
    fence = opening + tokentable.statements("postgresql", f"EXISTS (SELECT 1 {_HELD})")[0]
    if held[0] == "exclusive":
        return _Named(key8, ids, *statements, _UNLOCK, {}, fence)
    hold = hold_parameters(prefix, name, key8, ids, held)
    return _Named(key8, ids, *statements, UNLOCK_HELD, hold, fence)


@dataclass
class PostgresLease(Lease):
    connection: Connection[Any] | None = None
    named: _Named | None = None


class PostgresBackend(Backend, Waiting, Fencing, Semaphore, Shared, TablePeriods):
    strategy: ClassVar[str] = "postgres"
    heartbeat: ClassVar[bool] = True  # checks that the session still holds the lock

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.alias = options.database_alias
        self.sessions = Sessions(self.alias)
        problems = self.check_settings(options)
        if problems:
            raise ImproperlyConfigured(problems[0].msg)

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        missing = missing_driver("postgres", "psycopg", "postgres", "isolatable.E030")
        if missing:
            return missing
        if options.database_alias not in connections.settings:
            return [_alias_error(options.database_alias, "is not in settings.DATABASES")]
        if connections[options.database_alias].vendor != "postgresql":
            return [_alias_error(options.database_alias, "is not a PostgreSQL database")]
        return []

    def store(self) -> str:
        return f"postgres database {self.alias!r}"

    def key(self, name: str) -> int:
        return advisory_key(self.options.key_prefix, name)

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        return self._take(name, info, None)

    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        milliseconds = min(max(1, round(timeout * 1000)), _LONGEST_WAIT)
        return self._take(name, info, str(milliseconds))

    def _take(self, name: str, info: LockInfo, wait: str | None) -> Lease | None:
        """One attempt (``wait`` None), or a wait in the server's queue of ``wait`` ms."""
        import psycopg

        named = _named(self.options.key_prefix, name, info)
        label = session_label(info)
        connection = self.sessions.connect()
        try:
            if wait is None:
                row = self.sessions.run(connection, named.try_lock, (named.key, label))
            else:
                params = (wait, named.key, label)
                row = self.sessions.run(connection, named.wait, params, waits=True)
        except psycopg.errors.LockNotAvailable:
            # lock_timeout can fire as the lock is granted: the statement fails, and the
            # session holds the lock. It is this caller's then.
            row = self.sessions.run(connection, _CLAIM, (label, *named.ids)) or ("",)
        if row is None or not row[0]:
            self.sessions.put_back(connection)
            if row is None or row[0] is None:  # the session held a lock: another client's
                raise LockIOError(pooled(f"database {self.alias!r}"))
            return None
        return PostgresLease(name, info.token or "", info, connection=connection, named=named)

    def acquire_slot(self, name: str, info: LockInfo, max_holders: int) -> Lease | None:
        return self._hold(name, info)

    def acquire_shared(self, name: str, info: LockInfo) -> Lease | None:
        return self._hold(name, info)

    def _hold(self, name: str, info: LockInfo) -> Lease | None:
        """One attempt at a slot or shared hold, as ``info`` says (pgholders)."""
        named = _named(self.options.key_prefix, name, info)
        connection = self.sessions.connect()
        params = {**named.hold, "label": session_label(info)}
        row = self.sessions.run(connection, named.try_lock, params)
        if row is None or not row[0] or row[0] == OTHER_COUNT:
            self.sessions.put_back(connection)
            if row is None or row[0] is None:  # the session held a lock: another client's
                raise LockIOError(pooled(f"database {self.alias!r}"))
            error = row[0] and mismatch(name, self.inspect(name), info.max_holders)
            if error:
                raise error
            return None
        return PostgresLease(name, info.token or "", info, connection=connection, named=named)

    def release(self, lease: Lease) -> bool:
        if not isinstance(lease, PostgresLease) or lease.connection is None:
            return False  # a dead holder's session lock went with its connection
        connection, lease.connection = lease.connection, None
        if lease.pid != this_pid() or lease.named is None:
            return False  # a forked child's copy: the session is the parent's
        try:
            row = self.sessions.run(connection, lease.named.unlock, (lease.named.key,))
        except LockIOError:
            return False  # the session is gone, and the lock with it
        self.sessions.put_back(connection)
        return row is not None and row[0] is True

    def refresh(self, lease: Lease, ttl: float) -> bool:
        """Whether the lease's session still holds its lock. False as well when the session is
        gone or does not answer within ``ttl`` seconds: its connection is closed then, which
        ends the session (and the lock) once the server notices."""
        if not isinstance(lease, PostgresLease) or lease.named is None:
            return False
        connection = lease.connection  # read once: the owner's release may clear it meanwhile
        if connection is None:
            return False
        return self.sessions.holds(connection, lease.named.holds, lease.named.ids, ttl, lease.name)

    def fencing_token(self, lease: Lease) -> int | None:
        """The name's next count in ``tokentable``, counted on the lease's own session while
        it holds the lock: a session that ended (force-released) issues none."""
        if not isinstance(lease, PostgresLease) or lease.named is None:
            return None
        connection = lease.connection
        if connection is None:
            return None
        # Made first on a connection of its own: a failed statement would end the session.
        tokentable.ensure(private_connection(self.alias), self.alias)
        key = dbtable.name_hash(self.options.key_prefix, lease.name)
        name = lease.name.encode("utf-8", "backslashreplace").decode()
        try:
            row = self.sessions.run(connection, lease.named.fence, (key, name, *lease.named.ids))
            token = None if row is None else int(row[0])
            if token is not None:  # its record in the session's statements (renewals' too)
                named = _named(
                    self.options.key_prefix, lease.name, replace_token(lease.info, token)
                )
                lease.named = named
                self.sessions.run(connection, named.holds, named.ids)  # shows it at once
        except LockIOError:
            return None  # the session is gone, and the lock with it
        return token

    def _holders(self, where: str, params: Any = ()) -> list[tuple[Any, ...]]:
        """(classid, objid, query, application_name) of granted advisory locks."""
        connection = self.sessions.connect()
        rows = self.sessions.execute(connection, HOLDERS + where, params).fetchall()
        self.sessions.put_back(connection)
        return rows

    def inspect(self, name: str) -> list[LockInfo]:
        classid, objid = lock_ids(self.key(name))
        return [
            replace(read_record(query or "", label or "", self.strategy), name=name, alive=True)
            for _, _, query, label in self._holders(ONE_NAME, {"classid": classid, "objid": objid})
        ]

    def list(self) -> Iterator[LockInfo]:
        marked = " AND starts_with(a.application_name, 'isolatable ')"
        for classid, objid, query, label in self._holders(marked):
            record = read_record(query or "", label or "", self.strategy)
            # Only this prefix's names map to the ids
            if record.name and lock_ids(self.key(record.name)) == (classid, objid):
                yield replace(record, alive=True)

    def force_release(self, name: str, token: str | None = None) -> bool:
        classid, objid = lock_ids(self.key(name))
        connection = self.sessions.connect()
        params = {"classid": classid, "objid": objid, "token": token}
        row = self.sessions.run(connection, TERMINATE, params)
        self.sessions.put_back(connection)
        return row is not None and row[0] is True

    def close(self) -> None:
        self.sessions.close()


def _alias_error(alias: str, problem: str) -> Error:
    return Error(
        f'settings.ISOLATABLE["DATABASE_ALIAS"] is {alias!r}, which {problem}; the postgres '
        "strategy needs a PostgreSQL database alias.",
        id="isolatable.E031",
    )
