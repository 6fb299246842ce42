"""The postgres strategy: session advisory locks on dedicated connections.

Each held lock keeps one psycopg connection of its own (opened from the ``DATABASE_ALIAS``
settings, never the ORM's connection, so Django closing or rolling back its connection cannot
drop the lock); connections are pooled per process and reused. The key is the first 8 bytes of
SHA-256(KEY_PREFIX + name) as a signed bigint. The holder's record travels in what
``pg_stat_activity`` shows of the holding session, which ``locks status`` reads: the fields that
are the same for every lock of a process (name, pid, host, start time, command line) as a comment
of its statements, whose text therefore repeats and gets prepared; the owner token and the time
it took the lock as its ``application_name`` (``isolatable <token> <µs>``). A killed holder's
lock disappears with its connection. Waiters queue on the server (``pg_advisory_lock`` with
``lock_timeout``), so handoff is immediate.

Session advisory locks need a session: a PgBouncer in transaction pooling mode breaks them.
A new connection checks that two statements run on the same server process and refuses
otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_isolatable.backends.base import Backend, BackendOptions, Lease, missing_driver
from django_isolatable.backends.pgsession import Row, Session, StatementError
from django_isolatable.errors import LockIOError
from django_isolatable.holders import (
    LockInfo,
    from_epoch_microseconds,
    new_record,
    new_token,
    stamped,
)

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5
_MARK = "isolatable:"
_COMMENT_FIELDS = ("name", "pid", "hostname", "host_id", "process_started_at", "argv")
_HOLDERS = (
    "SELECT l.classid::bigint, l.objid::bigint, a.query, a.application_name FROM pg_locks l "
    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
    "AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database "
    "WHERE datname = current_database())"
)


def _label(token: str) -> str:
    """SQL for the lease's part of the record, the session's ``application_name``: "isolatable
    <token> <µs>", the time the server's clock, when the statement got the lock. At most 60
    bytes of the 63 it keeps."""
    return (
        f"'isolatable ' || {token}::text || ' ' || "
        "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    )


# One statement each (a transaction-mode pooler could run two on different sessions). The owner
# setting is read before the lock is tried, so a session that already held it for another
# client (advisory locks are reentrant) is caught; CTEs that reference each other run in order.
# Each returns the owner setting before the claim, whether it got the lock, the token and the
# label. Parameters: $1 the owner setting's name, $2 the key, $3 the token.
_TRY_LOCK = (
    "WITH b AS MATERIALIZED (SELECT current_setting($1, true) o), "
    "a AS MATERIALIZED (SELECT pg_try_advisory_lock($2::bigint) g FROM b) "
    "SELECT o, g, CASE WHEN g THEN set_config($1, $3, false) END, "
    f"CASE WHEN g THEN set_config('application_name', {_label('$3')}, false) END FROM b, a"
)
_CLAIM = (  # $1 owner setting, $2 token
    "WITH b AS MATERIALIZED (SELECT current_setting($1, true) o) SELECT o, true, "
    f"set_config($1, $2, false), set_config('application_name', {_label('$2')}, false) FROM b"
)


def _wait_and_claim(sets_timeout: bool) -> str:
    """A waiter queues on the server and claims the lock in the same statement once it is
    granted, so a handoff costs no round trip more than the grant. The grant time is the
    server's, in microseconds. Parameters: ($1 lock_timeout in ms, if ``sets_timeout``), then
    the owner setting, the key and the token. lock_timeout is read when the wait starts, after
    the first CTE set it; a session whose lock_timeout is already right skips that CTE."""
    first = 2 if sets_timeout else 1
    owner, key, token = (f"${number}" for number in range(first, first + 3))
    timeout = "t AS MATERIALIZED (SELECT set_config('lock_timeout', $1, false)), "
    return (
        f"WITH {timeout if sets_timeout else ''}"
        f"b AS MATERIALIZED (SELECT current_setting({owner}, true) o"
        f"{' FROM t' if sets_timeout else ''}), "
        f"a AS MATERIALIZED (SELECT pg_advisory_lock({key}::bigint) FROM b) "
        f"SELECT o, set_config({owner}, {token}::text, false), "
        f"set_config('application_name', {_label(token)}, false) FROM b, a"
    )


_WAIT_AND_CLAIM = _wait_and_claim(sets_timeout=True)
_WAIT_AND_CLAIM_AS_SET = _wait_and_claim(sets_timeout=False)
# $1 key, $2 owner setting, $3 the owner setting's value before the claim
_UNDO_CLAIM = "SELECT pg_advisory_unlock($1::bigint), set_config($2, $3, false)"
# $1 key, $2 owner setting. The application_name stays as it is: only a session that holds the
# lock counts, and the next claim sets it (changing it costs a message to the client each time).
_UNLOCK = "SELECT pg_advisory_unlock($1::bigint), set_config($2, '', false)"
_HOLDS = (  # $1, $2: pg_locks (classid, objid)
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
    "AND pid = pg_backend_pid() AND objsubid = 1 AND classid = $1 AND objid = $2"
)
# pg_stat_activity.query keeps track_activity_query_size bytes (1024 by default, its NUL
# included): the record gets what the longest statement that carries it leaves.
_RECORD_STATEMENTS = (_TRY_LOCK, _CLAIM, _WAIT_AND_CLAIM, _WAIT_AND_CLAIM_AS_SET, _HOLDS)
_RECORD_BUDGET = 1023 - max(map(len, _RECORD_STATEMENTS)) - len(f" /*{_MARK}*/")

_LOCK_NOT_AVAILABLE = "55P03"  # the SQLSTATE of a wait cut short by lock_timeout

# Idle sessions by database alias. list.pop and list.append are atomic: threads share the
# pools without a lock.
_idle: dict[str, list[Session]] = {}


class _Granted(NamedTuple):
    """What ``wait`` got from the server's queue, for the next ``acquire`` of that thread."""

    session: Session
    previous_owner: str | None = None
    token: str | None = None  # the owner token it claimed; None: granted as lock_timeout fired
    label: str | None = None  # the application_name it set, with the server's time of the grant


_waited: dict[tuple[str, str, int], _Granted] = {}


def _forget_after_fork() -> None:
    # The child shares the parent's sockets; psycopg never closes them from another PID.
    _idle.clear()
    _waited.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


@functools.lru_cache(maxsize=4096)
def advisory_key(name: str) -> int:
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_ids(key: int) -> tuple[int, int]:
    """``pg_locks`` (classid, objid) of a bigint advisory lock: its high and low 32 bits."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


def _comment(info: LockInfo) -> str:
    """The process's part of the record as a SQL comment that fits ``pg_stat_activity.query``
    (1024 bytes by default). The same for every lock of a name in a process, so statements that
    carry it get prepared.

    A long command line is shortened first, then a long name (``inspect`` knows the name it
    asks for; ``list`` cannot show such a lock). "\\/" is valid JSON for "/", so the record can
    never open or close a comment (and a "$1" inside one is no placeholder).
    """
    data = {key: value for key, value in info.to_dict().items() if key in _COMMENT_FIELDS}
    text = json.dumps(data).replace("/", "\\/")  # ASCII: lone surrogates cannot break it
    for field in ("argv", "name"):
        if len(text) <= _RECORD_BUDGET:
            break
        data[field] = None
        text = json.dumps(data).replace("/", "\\/")
    return f" /*{_MARK}{text}*/"


def _record(query: str, application_name: str, strategy: str) -> LockInfo | None:
    start = query.find("/*" + _MARK)
    end = query.rfind("*/")
    if start < 0 or end < start:
        return None
    try:
        data = json.loads(query[start + 2 + len(_MARK) : end])
    except ValueError:
        return None
    name = data.get("name") if isinstance(data, dict) else None
    info = LockInfo.from_dict(name if isinstance(name, str) else "", strategy, data)
    _, token, microseconds = [*application_name.split(" "), "", "", ""][:3]
    return replace(info, token=token or None, acquired_at=from_epoch_microseconds(microseconds))


class _Named:
    """What the strategy uses on every lock of one name, made once: its advisory key, owner
    setting, and the statements that carry the process's part of its record as a comment."""

    __slots__ = ("claim", "holds", "key", "owner", "try_lock", "wait", "wait_as_set")

    def __init__(self, key: int, comment: str) -> None:
        self.key = key
        self.owner = _owner_setting(key)
        self.try_lock = _TRY_LOCK + comment
        self.claim = _CLAIM + comment
        self.wait = _WAIT_AND_CLAIM + comment
        self.wait_as_set = _WAIT_AND_CLAIM_AS_SET + comment
        self.holds = _HOLDS + comment  # the renewal thread's check keeps the record shown


@dataclass
class PostgresLease(Lease):
    session: Session | None = None
    named: _Named | None = None


class PostgresBackend(Backend):
    strategy: ClassVar[str] = "postgres"
    heartbeat: ClassVar[bool] = True
    queued_wait: ClassVar[bool] = True  # checks that the session still holds the lock
    wait_takes_lock: ClassVar[bool] = True
    poll_interval: ClassVar[float] = 2.0  # waits block in the server's lock queue

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.alias = options.database_alias
        self._names: dict[str, _Named] = {}
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

    def key(self, name: str) -> int:
        return advisory_key(self.options.key_prefix + name)

    def _connect(self) -> Session:
        pool = _idle.get(self.alias)
        if pool:
            try:
                return pool.pop()
            except IndexError:  # another thread took the last one meanwhile
                pass
        import psycopg

        params = connections[self.alias].get_connection_params()
        for key in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(key, None)
        params.setdefault("connect_timeout", CONNECT_TIMEOUT)
        where = f"database {self.alias!r} ({params.get('host', 'local socket')})"
        try:
            session = Session(
                psycopg.connect(autocommit=True, application_name="isolatable", **params)
            )
        except psycopg.Error as e:
            raise LockIOError(f"PostgreSQL {where} is unreachable: {e}".strip()) from e
        first = self._run(session, "SELECT pg_backend_pid()", prepare=False)
        second = self._run(session, "SELECT pg_backend_pid()", prepare=False)
        if first != second:  # a busy transaction-mode pooler; a quiet one is caught at acquire
            session.close()
            raise LockIOError(_pooled(where))
        return session

    def _put_back(self, session: Session) -> None:
        if not session.idle:
            session.close()
            return
        pool = _idle.get(self.alias)
        if pool is None:
            pool = _idle.setdefault(self.alias, [])
        pool.append(session)

    def _run(
        self,
        session: Session,
        sql: str,
        params: Sequence[str | int | None] = (),
        prepare: bool = True,
    ) -> Row:
        """The first row of ``sql`` on ``session``; on any failure the session is closed and
        ``LockIOError`` raised."""
        try:
            return session.run(sql, params, prepare)
        except StatementError as e:
            raise self._failed(session, e) from e

    def _failed(self, session: Session, error: StatementError) -> LockIOError:
        """Closes ``session`` (its state is not to be trusted) and names the failure."""
        session.close()
        return LockIOError(f"PostgreSQL database {self.alias!r} failed: {error}".strip())

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        named = self._named(name, info)
        granted = _waited.pop((self.alias, name, threading.get_ident()), None)
        token = info.token or ""
        if granted is None:
            session = self._connect()
            previous_owner, got, _, label = self._run(
                session, named.try_lock, (named.owner, named.key, token)
            )
            if got != "t":
                self._put_back(session)
                return None
        elif granted.token is None:  # granted as the wait timed out: claim it now
            session = granted.session
            previous_owner, _, _, label = self._run(session, named.claim, (named.owner, token))
        else:  # wait() took and claimed it
            session, previous_owner, label = granted.session, granted.previous_owner, granted.label
            token = granted.token
        # The record's time is the server's, as status shows it: lock() may have made the
        # record before a wait (wait_takes_lock).
        acquired_at = from_epoch_microseconds((label or "").rpartition(" ")[2])
        info = stamped(info, token or "", acquired_at or info.acquired_at)
        if previous_owner:
            # Another client's lock in this very server session, granted again because advisory
            # locks are reentrant: only a pooler sharing sessions between clients does that.
            self._run(session, _UNDO_CLAIM, (named.key, named.owner, previous_owner))
            self._put_back(session)
            raise LockIOError(_pooled(f"database {self.alias!r}"))
        return PostgresLease(name, token or "", info, session=session, named=named)

    def _named(self, name: str, info: LockInfo) -> _Named:
        """``name``'s key and statements, with the record of ``info``'s process (made once)."""
        named = self._names.get(name)
        if named is None:
            if len(self._names) > 256:
                self._names.clear()
            named = self._names[name] = _Named(self.key(name), _comment(info))
        return named

    def release(self, lease: Lease) -> bool:
        if not isinstance(lease, PostgresLease) or lease.session is None:
            return False  # a dead holder's session lock went with its connection
        session, lease.session = lease.session, None
        if lease.pid != os.getpid():
            return False  # a forked child's copy: the session is the parent's
        named = lease.named or self._named(lease.name, lease.info)
        try:
            released = self._run(session, _UNLOCK, (named.key, named.owner))[0]
        except LockIOError:
            return False  # the session is gone, and the lock with it
        self._put_back(session)
        return released == "t"

    def refresh(self, lease: Lease, ttl: float) -> bool:
        if not isinstance(lease, PostgresLease):
            return False
        session = lease.session  # read once: the owner's release may clear it meanwhile
        if session is None:
            return False
        named = lease.named or self._named(lease.name, lease.info)
        try:
            return self._holds(session, named.key, named.holds)
        except LockIOError:
            return False  # the session was terminated: its lock is gone

    def _holds(self, session: Session, key: int, statement: str = _HOLDS) -> bool:
        """Whether ``session`` holds advisory lock ``key``; ``statement`` is ``_HOLDS``, or a
        name's, which keeps the holder's record in ``pg_stat_activity.query``."""
        return self._run(session, statement, lock_ids(key))[0] != "0"

    def _holders(
        self, where: str = "", params: tuple[int, ...] = ()
    ) -> list[tuple[tuple[int, int], str, str]]:
        """(pg_locks ids, the holding session's last statement and application_name) of granted
        advisory locks."""
        session = self._connect()
        try:
            rows = session.rows(_HOLDERS + where, params, prepare=False)
        except StatementError as e:
            raise self._failed(session, e) from e
        self._put_back(session)
        return [
            ((int(classid or 0), int(objid or 0)), query or "", label or "")
            for classid, objid, query, label in rows
        ]

    def inspect(self, name: str) -> LockInfo | None:
        holders = self._holders(" AND l.classid = $1 AND l.objid = $2", lock_ids(self.key(name)))
        if not holders:
            return None
        _, query, label = holders[0]
        record = _record(query, label, self.strategy) or LockInfo(name, self.strategy)
        return replace(record, name=name, alive=True)  # the server says the session holds it

    def list(self) -> Iterator[LockInfo]:
        for ids, query, label in self._holders(" AND a.application_name LIKE 'isolatable%'"):
            record = _record(query, label, self.strategy)  # only this prefix's names map to ids
            if record is not None and record.name and lock_ids(self.key(record.name)) == ids:
                yield replace(record, alive=True)

    def force_release(self, name: str) -> bool:
        session = self._connect()
        sql = (
            # Waits up to 5 s for the session to end (PostgreSQL 14+), so the lock is free after.
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_locks "
            "WHERE locktype = 'advisory' "
            "AND granted AND objsubid = 1 AND classid = $1 AND objid = $2 "
            "AND pid <> pg_backend_pid()"
        )
        terminated = self._run(session, sql, lock_ids(self.key(name)), prepare=False)[0]
        self._put_back(session)
        return terminated != "0"

    def wait(self, name: str, timeout: float) -> None:
        """Queue for the lock on the server for up to ``timeout`` seconds; when it is granted,
        claim it in the same statement and keep it for this thread's next ``acquire``."""
        # The record only if the name has no statements yet: most waits find them made.
        named = self._names.get(name) or self._named(name, new_record(name, self.strategy))
        session = self._connect()
        key = named.key
        token = new_token()
        milliseconds = max(1, int(timeout * 1000))
        granted: _Granted
        try:
            if session.lock_timeout == milliseconds:  # most waits: the poll interval each time
                row = session.run(named.wait_as_set, (named.owner, key, token))
            else:
                session.lock_timeout = None  # unknown until the statement succeeds
                row = session.run(named.wait, (milliseconds, named.owner, key, token))
                session.lock_timeout = milliseconds
            previous_owner, _, label = row
        except StatementError as e:
            # A failed statement's set_config is undone: the session's lock_timeout is the one
            # before it, so the next wait sets it again.
            if e.sqlstate != _LOCK_NOT_AVAILABLE:
                raise self._failed(session, e) from e
            # The timeout can fire just as the lock is granted: the statement fails, the
            # session lock stays. Keep it then, or the session would hold it unknowingly.
            if not self._holds(session, key):
                self._put_back(session)
                return
            granted = _Granted(session)
        else:  # the session's record now shows this token and the server's time of the grant
            granted = _Granted(session, previous_owner, token, label)
        _waited[(self.alias, name, threading.get_ident())] = granted


@functools.lru_cache(maxsize=4096)
def _owner_setting(key: int) -> str:
    """The session setting that names this session's holder of advisory lock ``key``."""
    return f"isolatable.owner_{key & 0xFFFFFFFFFFFFFFFF:016x}"


def _pooled(where: str) -> str:
    return (
        f"PostgreSQL {where} is reached through a pooler that shares server sessions between "
        "clients (PgBouncer in transaction mode?); session advisory locks need a session of "
        "their own. Point ISOLATABLE['DATABASE_ALIAS'] at a direct or session-pooled connection."
    )


def _alias_error(alias: str, problem: str) -> Error:
    return Error(
        f'settings.ISOLATABLE["DATABASE_ALIAS"] is {alias!r}, which {problem}; the postgres '
        "strategy needs a PostgreSQL database alias.",
        id="isolatable.E031",
    )
