"""The postgres strategy's session: statements straight through libpq, prepared once each."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import services

pytest.importorskip("psycopg")


class Interrupted(Exception):
    pass


def _connect() -> Any:
    import psycopg

    from django_isolatable.backends.pgsession import Session

    host, port = services.SERVERS["postgres"]
    connection = psycopg.connect(
        host=host, port=port, user="postgres", dbname="test", autocommit=True, connect_timeout=5
    )
    return Session(connection)


@pytest.fixture
def open_session() -> Iterator[Callable[[], Any]]:
    """Opens sessions, closed after the test."""
    services.require("postgres")
    opened: list[Any] = []
    yield lambda: opened.append(_connect()) or opened[-1]
    for session in opened:
        session.close()


@pytest.fixture
def session(open_session):
    return open_session()


@pytest.fixture
def observer(open_session):
    """A second session, to look at the first from outside."""
    return open_session()


def test_run_returns_the_first_row_as_text_and_null_as_none(session):
    assert session.run("SELECT $1::int + 1, NULL, 'é'", (41,)) == ("42", None, "é")
    assert session.rows("SELECT generate_series(1, $1::int)", (3,)) == [("1",), ("2",), ("3",)]


def test_a_statement_is_prepared_once_and_reused(session):
    sql = "SELECT $1::text || 'x'"
    for value in ("a", "b", "c"):
        assert session.run(sql, (value,)) == (f"{value}x",)
    assert session.rows("SELECT count(*) FROM pg_prepared_statements", prepare=False) == [("1",)]


def test_a_refused_statement_raises_with_its_sqlstate_and_the_session_goes_on(session):
    from django_isolatable.backends.pgsession import StatementError

    with pytest.raises(StatementError, match="division by zero") as raised:
        session.run("SELECT 1 / $1::int", (0,))
    assert raised.value.sqlstate == "22012"
    with pytest.raises(StatementError, match="syntax error") as raised:
        session.run("SELEC 1")
    assert raised.value.sqlstate == "42601"
    assert session.idle
    assert session.run("SELECT 1 / $1::int", (1,)) == ("1",)


def test_a_statement_with_no_row_is_an_error(session):
    from django_isolatable.backends.pgsession import StatementError

    with pytest.raises(StatementError, match="no row"):
        session.run("SELECT 1 WHERE false")
    assert session.rows("SELECT 1 WHERE false") == []


def test_a_parameter_larger_than_the_socket_buffer_is_sent_whole(session):
    """The connection is non-blocking: a statement the socket cannot take at once is flushed
    as the server reads it."""
    value = "x" * 20_000_000
    assert session.run("SELECT length($1::text)", (value,)) == (str(len(value)),)


def test_prepared_statements_are_bounded(session, monkeypatch):
    from django_isolatable.backends import pgsession

    monkeypatch.setattr(pgsession, "MAX_PREPARED", 5)
    for number in range(12):
        assert session.run(f"SELECT {number}") == (str(number),)
    count = session.run("SELECT count(*) FROM pg_prepared_statements", prepare=False)
    assert count == ("5",)
    assert session.run("SELECT 0") == ("0",)  # dropped, prepared again


def test_an_interrupted_statement_closes_the_session_and_ends_its_server_process(session, observer):
    """A signal handler raising during the wait for a result (as Ctrl-C does): the session's
    state is unknown, so it is closed, and the server process with whatever it held."""
    assert threading.current_thread() is threading.main_thread()
    pid = session.backend_pid
    session.run("SELECT pg_advisory_lock($1::bigint)", (4242_0001,))

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            session.run("SELECT pg_sleep(30)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert session.closed
    deadline = time.monotonic() + 10
    while observer.run("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", (pid,)) != ("0",):
        assert time.monotonic() < deadline, "the interrupted session's server process lives on"
        time.sleep(0.05)
    assert observer.run("SELECT pg_try_advisory_lock($1::bigint)", (4242_0001,)) == ("t",)
    observer.run("SELECT pg_advisory_unlock($1::bigint)", (4242_0001,))


def test_a_terminated_session_is_lost_and_closed(session, observer):
    import psycopg

    from django_isolatable.backends.pgsession import SessionLost

    observer.run("SELECT pg_terminate_backend($1, 5000)", (session.backend_pid,))
    with pytest.raises(SessionLost) as raised:
        session.run("SELECT 1")
    assert isinstance(raised.value.__cause__, psycopg.OperationalError)
    assert raised.value.sqlstate is None
    assert session.closed


def test_one_session_is_used_by_one_thread_at_a_time(session):
    """The lease's owner and the renewal thread may run statements on one session at once."""
    results: list[tuple[str | None, ...]] = []
    errors: list[BaseException] = []

    def use(number: int) -> None:
        try:
            for _ in range(50):
                results.append(session.run("SELECT $1::int", (number,)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=use, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert sorted(results) == sorted([(str(number),) for number in range(4) for _ in range(50)])
