"""The postgres strategy's connections: opened, pooled, and run statements on, safely.

A lock connection is a psycopg connection in autocommit mode, used only through
``Connection.execute``. Whatever interrupts a statement (an error, ``KeyboardInterrupt``, a signal
handler's exception) closes its connection, the statement cancelled first if it still runs: the
connection's state is unknown then, and ending its session frees what it held or queued for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any

from django.db import connections

from django_isolatable.errors import LockIOError

if TYPE_CHECKING:
    from psycopg import Connection, Cursor

logger = logging.getLogger("django_isolatable.backends.postgres")

CONNECT_TIMEOUT = 5
#: Seconds an interrupted statement's cancel request may take before its connection is closed.
CANCEL_TIMEOUT = 5
#: libpq settings of the lock connections unless the alias's OPTIONS set them: a connection whose
#: packets go unanswered fails instead of hanging (seconds; tcp_user_timeout in milliseconds).
TCP_SETTINGS = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}
#: The application_name of a lock connection that holds no lock.
IDLE_LABEL = "isolatable"
#: Opens every lock statement's CASE, which evaluates its branches in order, ordering the
#: pooler check, the locks and the claim within one statement (a transaction pooler may run two
#: statements on two server sessions). A session whose application_name carries a token holds
#: a lock already: handed to this client, it is another client's session (a pooler), and the
#: answer is NULL.
HELD_ALREADY = "WHEN starts_with(current_setting('application_name'), 'isolatable ') THEN NULL"

# Idle connections by database alias. list.pop and list.append are atomic: threads share the
# pools without a lock.
_idle: dict[str, list[Connection[Any]]] = {}
# A forked child shares its parent's sockets and must never talk on them (psycopg never closes
# a connection another process opened).
os.register_at_fork(after_in_child=_idle.clear)


class Sessions:
    """The lock connections of one database alias in this process."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def connect(self) -> Connection[Any]:
        """An idle connection of the pool that the server did not end, or a new one
        (``LockIOError`` if it cannot be had).

        A new one checks that two statements run in the same server session: a pooler that
        shares server sessions between clients (PgBouncer in transaction mode) is refused.
        """
        pool = _idle.get(self.alias)
        while pool:
            try:
                connection = pool.pop()
            except IndexError:  # another thread took the last one meanwhile
                break
            # An idle connection has nothing to read unless the server ended its session (a
            # restart, pg_terminate_backend): then it is closed, not used.
            readable = select.poll()
            readable.register(connection.fileno(), select.POLLIN)
            if not readable.poll(0):
                return connection
            connection.close()
        import psycopg

        params = connections[self.alias].get_connection_params()
        for key in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(key, None)
        params = {**TCP_SETTINGS, "connect_timeout": CONNECT_TIMEOUT, **params}
        params.update(autocommit=True, application_name=IDLE_LABEL)
        where = f"database {self.alias!r} ({params.get('host') or 'local socket'})"
        try:
            connection = psycopg.connect(**params)
        except psycopg.Error as e:
            raise LockIOError(f"PostgreSQL {where} is unreachable: {e}".strip()) from e
        first = self.run(connection, "SELECT pg_backend_pid()")
        if first != self.run(connection, "SELECT pg_backend_pid()"):  # a busy pooler
            connection.close()
            raise LockIOError(pooled(where))
        return connection

    def put_back(self, connection: Connection[Any]) -> None:
        """Return an idle connection (that holds no lock) to the pool; close any other."""
        if connection.info.transaction_status.name != "IDLE":
            connection.close()  # closed or broken (UNKNOWN), or in a statement
            return
        _idle.setdefault(self.alias, []).append(connection)

    def run(
        self, connection: Connection[Any], sql: str, params: Any = (), *, waits: bool = False
    ) -> tuple[Any, ...] | None:
        """The first row of ``sql`` on ``connection`` (None if none), as ``execute``."""
        return self.execute(connection, sql, params, waits=waits).fetchone()

    def execute(
        self, connection: Connection[Any], sql: str, params: Any = (), *, waits: bool = False
    ) -> Cursor[Any]:
        """``sql``'s result, read whole. Any failure, an interrupt included, closes the
        connection. psycopg's errors are raised as ``LockIOError``, except a ``lock_timeout``
        that ended a wait (``waits``): that connection is fine."""
        import psycopg

        try:
            return connection.execute(sql, params)
        except BaseException as e:
            if waits and isinstance(e, psycopg.errors.LockNotAvailable):
                raise
            abandon(connection)
            if isinstance(e, psycopg.Error):
                raise LockIOError(f"PostgreSQL database {self.alias!r} failed: {e}".strip()) from e
            raise

    def holds(
        self, connection: Connection[Any], sql: str, params: Any, seconds: float, name: str
    ) -> bool:
        """Whether ``sql``, a count of the holds of lock ``name`` by ``connection``'s session, is
        above 0, answered within ``seconds``: past them the connection's socket is shut down
        (``Deadline``), which ends the session. A session found gone is logged, with why."""
        import psycopg

        deadline = Deadline(connection, seconds)
        try:
            with deadline:
                row = self.run(connection, sql, params)
        except (LockIOError, psycopg.Error, OSError) as e:  # psycopg's: closed meanwhile
            if deadline.passed:
                logger.warning(
                    "Lock %s: PostgreSQL database %r did not answer its check within %g s; its "
                    "connection is closed, which ends its session and the lock",
                    name,
                    self.alias,
                    seconds,
                )
            else:
                why = str(e.__cause__ or e).strip().splitlines() or [type(e).__name__]
                logger.warning(
                    "Lock %s: its session on PostgreSQL database %r ended (%s), and the lock "
                    "with it",
                    name,
                    self.alias,
                    why[0],
                )
            return False
        return not deadline.passed and row is not None and row[0] > 0

    def close(self) -> None:
        """Close the idle connections of the pool."""
        pool = _idle.get(self.alias)
        while pool:
            with contextlib.suppress(IndexError):
                pool.pop().close()


def abandon(connection: Connection[Any]) -> None:
    """Close ``connection`` in whatever state. A statement still running is cancelled first: the
    server would otherwise go on with a wait in its lock queue, and take the lock, until it next
    wrote to the closed connection."""
    if connection.info.transaction_status.name == "ACTIVE":
        with contextlib.suppress(Exception):
            connection.cancel_safe(timeout=CANCEL_TIMEOUT)
    connection.close()


class Deadline:
    """Bounds a statement from the client's side: past ``seconds``, the connection's socket is
    shut down, which fails the statement (a server that takes packets but never answers would
    keep it waiting for ever, its TCP connection healthy). ``passed`` says if it came to that."""

    def __init__(self, connection: Connection[Any], seconds: float) -> None:
        # A duplicate of the descriptor: the socket it names stays this connection's
        self._duplicate: socket.socket | None = None
        with contextlib.suppress(Exception):  # closed already: its statement fails at once
            self._duplicate = socket.socket(fileno=os.dup(connection.fileno()))
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self.passed = False

    def _expire(self) -> None:
        with self._lock:
            if self._duplicate is not None:
                self.passed = True
                with contextlib.suppress(OSError):
                    self._duplicate.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._lock:
            watched, self._duplicate = self._duplicate, None
        if watched is not None:
            watched.close()


def pooled(where: str) -> str:
    """The error message for a pooler that shares server sessions between clients."""
    return (
        f"PostgreSQL {where} is reached through a pooler that shares server sessions between "
        "clients (PgBouncer in transaction mode?); session advisory locks need a session of "
        "their own. Point ISOLATABLE['DATABASE_ALIAS'] at a direct or session-pooled connection."
    )
