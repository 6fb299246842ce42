"""One dedicated PostgreSQL session of the postgres strategy, its statements run through libpq.

psycopg opens and closes the connection; statements go through its documented libpq wrapper
(``psycopg.pq``) instead of ``Connection.execute``, which spends 50-70 µs of client CPU per
statement on a cursor, parameter adaptation, its prepared-statement cache and row making. A lock
takes two statements, and with several processes per CPU that CPU is what bounds how many locks
a second pass (docs/performance.md). Here each statement is prepared on the server the first
time the session runs it, then only its parameters travel, as text: about 12 µs per statement.

Waiting for a result blocks in ``poll`` (the GIL released, interruptible by signals). Anything
that interrupts a statement before its result is read, ``KeyboardInterrupt`` included, cancels
the statement and closes the session: its server process ends, and every lock it held or
queued for with it.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg
    from psycopg.pq.abc import PGresult

_COMMAND_OK, _TUPLES_OK = 1, 2  # psycopg.pq.ExecStatus, without importing psycopg here
_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE
_SQLSTATE = ord("C")  # psycopg.pq.DiagnosticField.SQLSTATE

#: Prepared statements a session keeps (the least recently used one is dropped past that):
#: a few per lock name, since each carries the name's record as a comment.
MAX_PREPARED = 100

_FIRST_ROW = itertools.repeat(0)  # map(result.get_value, _FIRST_ROW, columns): row 0's values

Row = tuple[str | None, ...]


class StatementError(Exception):
    """The server refused a statement (``sqlstate`` says why); the session is still usable."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class SessionLost(StatementError):
    """The connection failed under a statement (broken, or its server process terminated): the
    session is closed. psycopg's error is the ``__cause__``.

    Anything else that interrupts a statement (``KeyboardInterrupt``, an exception raised by a
    signal handler) closes the session too, and is raised as it is.
    """


class Session:
    """An autocommit psycopg connection used only through this object, by one thread at a time
    (a lock guards it: a lease's owner and the renewal thread may both use it)."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection
        self._pgconn = connection.pgconn
        self._lock = threading.Lock()
        self._prepared: OrderedDict[str, bytes] = OrderedDict()  # SQL -> statement name
        self._named = 0
        #: The session's lock_timeout in ms as last set through it, None when unknown (a failed
        #: statement undoes its set_config): the postgres strategy's waits set it only if it
        #: changes.
        self.lock_timeout: int | None = None
        self._readable = select.poll()
        self._readable.register(self._pgconn.socket, select.POLLIN)

    @property
    def closed(self) -> bool:
        return self.connection.closed

    @property
    def idle(self) -> bool:
        """Open, with no transaction or statement in progress (a closed or broken connection's
        transaction status is UNKNOWN)."""
        return self._pgconn.transaction_status == _IDLE

    @property
    def backend_pid(self) -> int:
        return self._pgconn.backend_pid

    def close(self) -> None:
        self.connection.close()

    def run(self, sql: str, params: Sequence[str | int | None] = (), prepare: bool = True) -> Row:
        """The first row of ``sql`` (``$1``-style placeholders), as text (None for NULL);
        ``prepare=False`` for statements run once in a while, which should not take a prepared
        slot. Raises ``StatementError`` if the server refuses it or it returns no row."""
        result = self._execute(sql, params, prepare)
        if not result.ntuples:
            raise StatementError(f"no row returned by: {sql[:60]}")
        value = result.get_value
        return tuple(
            [
                None if cell is None else cell.decode()
                for cell in map(value, _FIRST_ROW, range(result.nfields))
            ]
        )

    def rows(
        self, sql: str, params: Sequence[str | int | None] = (), prepare: bool = True
    ) -> list[Row]:
        """Every row of ``sql``, as text (None for NULL)."""
        result = self._execute(sql, params, prepare)
        value = result.get_value
        columns = range(result.nfields)
        return [
            tuple(_text(value(row, column)) for column in columns) for row in range(result.ntuples)
        ]

    def _execute(self, sql: str, params: Sequence[str | int | None], prepare: bool) -> PGresult:
        values = [None if value is None else str(value).encode() for value in params]
        with self._lock:
            try:
                if prepare:
                    name = self._prepared.get(sql)
                    if name is None:
                        name = self._prepare(sql)
                    else:
                        self._prepared.move_to_end(sql)
                    self._pgconn.send_query_prepared(name, values)
                else:
                    self._pgconn.send_query_params(sql.encode(), values)
                result = self._result()
            except StatementError:
                raise  # refused when prepared: the session is idle
            except BaseException as e:
                self._abandon()
                if _driver_error(e):
                    raise SessionLost(str(e).strip() or type(e).__name__) from e
                raise
        if result.status != _TUPLES_OK:
            raise StatementError(_message(result), _sqlstate(result))
        return result

    def _abandon(self) -> None:
        """Close the session in the middle of a statement. The server would go on running it
        (a wait in a lock queue until its lock_timeout, and then hold the lock) until it next
        wrote to the closed connection: the statement is cancelled first."""
        with contextlib.suppress(Exception):
            self.connection.cancel()
        self.connection.close()

    def _prepare(self, sql: str) -> bytes:
        """Prepare ``sql`` on this session; its statement name."""
        if len(self._prepared) >= MAX_PREPARED:
            _, oldest = self._prepared.popitem(last=False)
            self._pgconn.send_query(b"DEALLOCATE " + oldest)
            self._result()
        self._named += 1
        name = b"isolatable_%d" % self._named
        self._pgconn.send_prepare(name, sql.encode())
        result = self._result()
        if result.status != _COMMAND_OK:
            raise StatementError(_message(result), _sqlstate(result))
        self._prepared[sql] = name
        return name

    def _result(self) -> PGresult:
        """The last result of the statement sent, once the server has finished it."""
        pgconn = self._pgconn
        if pgconn.flush():  # non-blocking connection: the rest goes once the socket takes it
            writable = select.poll()
            writable.register(pgconn.socket, select.POLLIN | select.POLLOUT)
            while pgconn.flush():
                writable.poll()
                pgconn.consume_input()
        result = None
        while True:
            while pgconn.is_busy():
                self._readable.poll()
                pgconn.consume_input()
            next_result = pgconn.get_result()
            if next_result is None:
                if result is None:
                    raise StatementError("the server returned no result")
                return result
            result = next_result


def _driver_error(error: BaseException) -> bool:
    import psycopg

    return isinstance(error, psycopg.Error)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _message(result: PGresult) -> str:
    return result.error_message.decode(errors="replace").strip()


def _sqlstate(result: PGresult) -> str | None:
    sqlstate = result.error_field(_SQLSTATE)
    return None if sqlstate is None else sqlstate.decode()
