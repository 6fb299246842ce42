"""The postgres backend through its own interface, against a real server: what each call does
to the server's sessions, and what it does when the server stops answering or a call is
interrupted. A frozen TCP proxy (SIGSTOP) stands in for a server that takes packets but never
answers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from django_isolatable.backends import BackendOptions, Lease
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, new_record
from tests import services
from tests.settings import KEY_PREFIX

pytest.importorskip("psycopg")

PROXY = """
import socket, sys, threading

def pipe(source, target):
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    for end in (source, target):
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
while True:
    client, _ = listener.accept()
    server = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    for source, target in ((client, server), (server, client)):
        threading.Thread(target=pipe, args=(source, target), daemon=True).start()
"""


class Proxy:
    """A TCP proxy in a process of its own in front of the test server; ``freeze()`` stops the
    process (its kernel still takes packets, nothing answers), ``thaw()`` resumes it."""

    def __init__(self) -> None:
        host, port = services.SERVERS["postgres"]
        self.process = subprocess.Popen(
            [sys.executable, "-c", PROXY, host, str(port)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def freeze(self) -> None:
        """Stop the proxy, and return once it is stopped (a signal takes effect when the
        process is next scheduled: on a busy machine it may still forward a moment)."""
        self.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while (
            Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T"
        ):
            assert time.monotonic() < deadline, "the proxy did not stop"
            time.sleep(0.001)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.thaw()
        self.process.kill()
        self.process.wait()


@pytest.fixture
def observer() -> Iterator[Any]:
    """A connection of the test's own, to look at the backend's sessions from outside."""
    import psycopg

    services.require("postgres")
    host, port = services.SERVERS["postgres"]
    settings = connections.settings["postgres"]
    connection = psycopg.connect(
        host=host, port=port, user=settings["USER"], dbname=settings["NAME"], autocommit=True
    )
    yield connection
    connection.close()


@pytest.fixture
def make_backend(tmp_path, observer) -> Iterator[Callable[..., Any]]:
    """Backends on the test server (or on ``alias``); every lease they hand out is released
    after the test."""
    from django_isolatable.backends.postgres import PostgresBackend

    leases: list[tuple[Any, Lease]] = []

    def make(prefix: str = KEY_PREFIX, alias: str = "postgres") -> Any:
        options = BackendOptions(lock_dir=tmp_path, ttl=3, key_prefix=prefix, database_alias=alias)
        backend = PostgresBackend(options)
        for method in ("acquire", "acquire_waiting"):
            taking = getattr(backend, method, None)
            if taking is not None:
                setattr(backend, method, _recording(taking, backend, leases))
        return backend

    yield make
    for backend, lease in leases:
        with contextlib.suppress(Exception):
            backend.release(lease)


def _recording(method: Callable[..., Any], backend: Any, leases: list[Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        lease = method(*args)
        if lease is not None:
            leases.append((backend, lease))
        return lease

    return call


@pytest.fixture
def backend(make_backend) -> Any:
    return make_backend()


@pytest.fixture
def name(request) -> str:
    return f"{request.node.name}-{time.monotonic_ns()}"


@contextlib.contextmanager
def alias_on_port(alias: str, port: int) -> Iterator[str]:
    """A database alias like the test server's, on another port."""
    connections.settings[alias] = {**connections.settings["postgres"], "PORT": port}
    try:
        yield alias
    finally:
        from django_isolatable.backends.pgsession import Sessions

        Sessions(alias).close()
        del connections.settings[alias]
        with contextlib.suppress(AttributeError):
            del connections[alias]


@pytest.fixture
def proxied(make_backend) -> Iterator[tuple[Proxy, Any]]:
    """A backend whose connections go through a proxy the test may freeze."""
    proxy = Proxy()
    try:
        with alias_on_port("pg-proxy", proxy.port) as alias:
            yield proxy, make_backend(alias=alias)
    finally:
        proxy.stop()


def holders(observer: Any, backend: Any, name: str) -> list[int]:
    """Server pids of the sessions holding ``name``'s lock."""
    from django_isolatable.backends.postgres import lock_ids

    rows = observer.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
        "AND classid::bigint = %s AND objid::bigint = %s",
        lock_ids(backend.key(name)),
    ).fetchall()
    return [pid for (pid,) in rows]


def session_ends(observer: Any, pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while observer.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()[0]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_lease_keeps_the_record_it_was_given_and_the_server_shows_it(backend, name):
    info = new_record(name, "postgres")
    lease = backend.acquire(name, info)
    assert lease is not None
    assert lease.info is info
    assert lease.token == info.token
    holder = (backend.inspect(name) or [None])[0]
    assert holder == dataclasses.replace(info, alive=True)
    assert [record.token for record in backend.list() if record.name == name] == [info.token]
    assert backend.acquire(name, new_record(name, "postgres")) is None
    assert backend.release(lease) is True
    assert backend.inspect(name) == []
    assert backend.release(lease) is False


def test_each_operation_is_one_statement(backend, name, monkeypatch):
    """Taken, checked and released on a connection that ran them before: one statement (one
    round trip) each, the same text every time, whatever the holder's record."""
    import psycopg

    statements: list[str] = []
    execute = psycopg.Connection.execute

    def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(query)
        return execute(self, query, *args, **kwargs)

    for _ in range(2):  # the connection opens and gets into the pool first
        backend.release(backend.acquire(name, new_record(name, "postgres")))
    monkeypatch.setattr(psycopg.Connection, "execute", counted)
    texts: list[list[str]] = []
    for _ in range(3):
        lease = backend.acquire(name, new_record(name, "postgres"))
        assert backend.refresh(lease, 3.0) is True
        assert backend.release(lease) is True
        texts.append(statements[:])
        statements.clear()
    assert len(texts[0]) == 3
    assert texts[0] == texts[1] == texts[2]
    for _ in range(2):  # a wait takes a free lock in one statement too, and claims it there
        backend.release(backend.acquire_waiting(name, new_record(name, "postgres"), 1.0))
        assert len(statements) == 2
        statements.clear()


@pytest.mark.parametrize(
    ("first", "second"),
    [(("P:ns:", "job"), ("P:", "ns:job")), (("P:", "job"), ("", "P:job"))],
    ids=["in-prefix", "empty-prefix"],
)
def test_a_prefix_and_a_name_are_joined_injectively(make_backend, name, first, second):
    """Issue 13.17: KEY_PREFIX "P:ns:" with name "job" and KEY_PREFIX "P:" with name "ns:job"
    were one lock (the prefix was joined to the name without a separator)."""
    for prefix, job in (first, second):
        # The test session's prefix goes in front of the name where the case has none
        backend = make_backend(prefix=prefix and f"{KEY_PREFIX}{prefix}")
        lock = f"{job if prefix else KEY_PREFIX + job}-{name}"
        assert backend.acquire(lock, new_record(lock, "postgres")) is not None


def test_release_of_a_lock_whose_session_was_terminated_is_false(backend, name, observer):
    """Issue 13.4: the session holding the lock is gone: release says so (False), quietly."""
    lease = backend.acquire(name, new_record(name, "postgres"))
    (pid,) = holders(observer, backend, name)
    observer.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    assert backend.release(lease) is False


def test_a_check_after_the_session_was_terminated_reports_the_lock_lost(backend, name, observer):
    lease = backend.acquire(name, new_record(name, "postgres"))
    assert backend.refresh(lease, 3.0) is True
    (pid,) = holders(observer, backend, name)
    observer.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    assert backend.refresh(lease, 3.0) is False
    assert backend.refresh(lease, 3.0) is False  # its connection is closed now
    assert backend.release(lease) is False
    assert backend.refresh(lease, 3.0) is False
    assert backend.acquire(name, new_record(name, "postgres")) is not None  # a new session


def test_a_check_on_a_server_that_stopped_answering_ends_within_the_ttl(proxied, name, observer):
    """Issue 13.6: a renewal check on a server behind a black hole blocked for ever, and every
    other lease of the process with it. It returns within its TTL now: lost."""
    proxy, backend = proxied
    lease = backend.acquire(name, new_record(name, "postgres"))
    assert backend.refresh(lease, 3.0) is True
    results: list[bool] = []
    proxy.freeze()
    started = time.monotonic()
    checking = threading.Thread(target=lambda: results.append(backend.refresh(lease, 1.0)))
    checking.start()
    checking.join(15)
    assert not checking.is_alive(), "the check still waits for the frozen server"
    assert results == [False]
    assert time.monotonic() - started < 5
    proxy.thaw()  # the server learns that the session closed, and frees the lock
    (pid,) = holders(observer, backend, name) or [0]
    assert pid == 0 or session_ends(observer, pid)


def test_store_names_the_database_alias(backend):
    assert backend.store() == "postgres database 'postgres'"


def test_force_release_with_a_token_ends_only_that_holders_session(backend, name, observer):
    info = new_record(name, "postgres")
    lease = backend.acquire(name, info)
    (pid,) = holders(observer, backend, name)
    assert backend.force_release(name, token="0" * 32) is False
    assert holders(observer, backend, name) == [pid]
    assert backend.force_release(name, token=info.token) is True
    assert holders(observer, backend, name) == []
    assert backend.release(lease) is False
    assert backend.force_release(name) is False


def test_force_release_without_a_token_ends_whichever_session_holds_it(backend, name, observer):
    backend.acquire(name, new_record(name, "postgres"))
    assert backend.force_release(name) is True
    assert holders(observer, backend, name) == []


def test_a_waiter_gets_a_free_lock_at_once(backend, name):
    info = new_record(name, "postgres")
    started = time.monotonic()
    lease = backend.acquire_waiting(name, info, 30.0)
    assert time.monotonic() - started < 5
    assert lease is not None
    assert lease.info is info
    assert backend.inspect(name)[0].token == info.token


def test_a_wait_that_times_out_leaves_nothing_held(backend, name, observer):
    holder = backend.acquire(name, new_record(name, "postgres"))
    for _ in range(3):  # the timeout is the statement's: none is left on the session after it
        started = time.monotonic()
        assert backend.acquire_waiting(name, new_record(name, "postgres"), 0.3) is None
        assert 0.25 < time.monotonic() - started < 5
    assert len(holders(observer, backend, name)) == 1
    assert backend.inspect(name)[0].token == holder.token
    assert backend.release(holder) is True
    lease = backend.acquire_waiting(name, new_record(name, "postgres"), 0.3)
    assert lease is not None


def test_a_release_hands_the_lock_to_the_waiter(make_backend, name):
    holder_backend, waiter_backend = make_backend(), make_backend()
    holder = holder_backend.acquire(name, new_record(name, "postgres"))
    got: list[Any] = []
    info = new_record(name, "postgres")
    waiter = threading.Thread(
        target=lambda: got.append(waiter_backend.acquire_waiting(name, info, 30))
    )
    waiter.start()
    time.sleep(0.3)  # queued on the server by now (were it not, it would take the lock later)
    assert holder_backend.release(holder) is True
    waiter.join(10)
    assert got
    assert got[0] is not None
    assert got[0].info is info
    assert holder_backend.inspect(name)[0].token == info.token


def queued(observer: Any, name: str) -> list[int]:
    """Server pids of the sessions waiting in the lock queue with a statement about ``name``."""
    rows = observer.execute(
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
        (f"%{name}%",),
    ).fetchall()
    return [pid for (pid,) in rows]


@contextlib.contextmanager
def raising_in(seconds: float, interrupt: type[BaseException]) -> Iterator[None]:
    """``interrupt`` raised by a SIGALRM handler after ``seconds``, as Ctrl-C or a command's
    signal handler would raise it."""
    assert threading.current_thread() is threading.main_thread()

    def raise_it(signum: int, frame: object) -> None:
        raise interrupt

    previous = signal.signal(signal.SIGALRM, raise_it)
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        with pytest.raises(interrupt):
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def eventually(condition: Callable[[], object], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Interrupted], ids=["ctrl-c", "handler"])
def test_an_interrupted_wait_leaves_nothing_held_or_queued(backend, name, observer, interrupt):
    """Ctrl-C, or a signal handler that raises, while waiting in the server's queue: the wait
    is cancelled and its session ended, so it never takes the lock later."""
    holder = backend.acquire(name, new_record(name, "postgres"))
    with raising_in(0.5, interrupt):
        backend.acquire_waiting(name, new_record(name, "postgres"), 30.0)
    assert eventually(lambda: not queued(observer, name)), "the interrupted wait is still queued"
    assert backend.release(holder) is True
    assert holders(observer, backend, name) == []


def test_a_wait_interrupted_after_the_grant_frees_the_lock(make_backend, proxied, name, observer):
    """The lock is granted while the answer is on its way (held up here in a frozen proxy) when
    the interrupt comes: the waiter closes its session, and the server frees the lock."""
    proxy, waiter = proxied
    direct = make_backend()
    holder = direct.acquire(name, new_record(name, "postgres"))

    def grant_while_frozen() -> None:
        eventually(lambda: queued(observer, name))
        proxy.freeze()
        direct.release(holder)

    granting = threading.Thread(target=grant_while_frozen)
    granting.start()
    with raising_in(1.5, Interrupted):
        waiter.acquire_waiting(name, new_record(name, "postgres"), 30.0)
    granting.join(10)
    assert len(holders(observer, direct, name)) == 1, "the lock was not granted to the waiter"
    proxy.thaw()
    assert eventually(lambda: not holders(observer, direct, name)), "the waiter still holds it"


def test_a_record_with_any_command_line_reads_back_whole_or_without_it(backend, name):
    """The record travels in a SQL comment that psycopg also reads for placeholders: a command
    line with "%", "*/" or quotes cannot break either; one too long for pg_stat_activity's
    1024 bytes is left out, and the rest of the record still reads."""
    for argv in (
        ("manage.py", "run", "--opt=50%", "*/", "/*", "/*/*", "'\"", "%s", "$1"),
        ("a" * 2000,),
    ):
        info = dataclasses.replace(new_record(name, "postgres"), argv=argv)
        lease = backend.acquire(name, info)
        holder = (backend.inspect(name) or [None])[0]
        assert (holder.pid, holder.host_id, holder.token) == (info.pid, info.host_id, info.token)
        assert holder.argv == (argv if len(argv) > 1 else ())
        assert backend.release(lease) is True


@pytest.mark.parametrize("tricky", ["/*", "*/", "/* x */ SELECT 1; --", "a/**/b", "%s"])
def test_a_name_with_comment_marks_locks_and_reads_back(backend, name, tricky):
    """PostgreSQL nests ``/*`` comments: a name that opened one swallowed the rest of the
    statement (found by the fuzzed-names property test). Names are data, never SQL."""
    name = f"{name}{tricky}"
    info = new_record(name, "postgres")
    lease = backend.acquire(name, info)
    assert lease is not None
    try:
        holder = (backend.inspect(name) or [None])[0]
        assert (holder.name, holder.token, holder.pid) == (name, info.token, info.pid)
        assert [i.token for i in backend.list() if i.name == name] == [info.token]
    finally:
        assert backend.release(lease) is True


def test_a_name_too_long_for_the_record_is_still_shown_when_asked_for(backend, observer):
    name = "n" * 1500
    info = new_record(name, "postgres")
    backend.acquire(name, info)
    assert backend.inspect(name)[0].token == info.token
    assert name not in [record.name for record in backend.list()]


def test_an_unreachable_server_is_a_lock_io_error(make_backend, name):
    from tests.services import free_port

    unreachable = r"PostgreSQL database 'pg-closed' \(127.0.0.1\) is unreachable: "
    with alias_on_port("pg-closed", free_port()) as alias, pytest.raises(LockIOError) as raised:
        make_backend(alias=alias).acquire(name, new_record(name, "postgres"))
    assert re.match(unreachable, str(raised.value))


def test_a_forked_child_never_uses_the_parents_connections(backend, name, observer):
    lease = backend.acquire(name, new_record(name, "postgres"))
    backend.release(backend.acquire(f"{name}-pooled", new_record(f"{name}-pooled", "postgres")))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            assert backend.release(lease) is False
            other = backend.acquire(f"{name}-child", new_record(f"{name}-child", "postgres"))
            status = 0 if other is not None and backend.release(other) else 2
        except BaseException:
            status = 1
        os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert backend.refresh(lease, 3.0) is True
    assert backend.inspect(name)[0].token == lease.token
    assert backend.release(lease) is True


def test_a_session_without_the_records_comment_still_shows_its_token_and_time():
    """A holding session whose statement another role cannot read ("<insufficient privilege>"),
    or whose last statement is not the strategy's (a pooler's other client ran one there)."""
    from django_isolatable.backends.pgholders import read_record

    for query in ("<insufficient privilege>", "SELECT 1", "/*isolatable:{*/ SELECT 1"):
        info = read_record(query, "isolatable tok 1000000", "postgres")
        assert info == LockInfo("", "postgres", token="tok", acquired_at=info.acquired_at)
        assert info.acquired_at.timestamp() == 1.0
    info = read_record('SELECT 1 /*isolatable:{"name": "x", "pid": 1}*/', "isolatable", "postgres")
    assert info == LockInfo("x", "postgres", pid=1)


def test_a_pooled_connection_whose_session_the_server_ended_is_not_used(backend, name, observer):
    """After a server restart or pg_terminate_backend, the idle connections of the pool are
    dead: the next lock gets a live one, not a LockIOError."""
    lease = backend.acquire(name, new_record(name, "postgres"))
    (pid,) = holders(observer, backend, name)
    backend.release(lease)  # its connection goes back to the pool
    observer.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    assert backend.acquire(name, new_record(name, "postgres")) is not None


def test_a_command_whose_session_was_terminated_while_it_ran_exits_non_zero(tmp_path, observer):
    """Issue 13.4, end to end: the lock lost a second into a run shorter than TTL / 3 (no check
    ran meanwhile) is found at release, and the command says so and exits 1, not 0."""
    from django_isolatable.backends.postgres import advisory_key, lock_ids

    key = f"lost-{time.monotonic_ns()}"
    marker = tmp_path / "ran"
    strategy = {"STRATEGY": "postgres", "DATABASE_ALIAS": "postgres", "KEY_PREFIX": KEY_PREFIX}
    command = subprocess.Popen(
        [sys.executable, "-m", "django", "isolated_echo", "--key", key, "--marker", str(marker),
         "--seconds", "4"],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
             "ISOLATABLE_TEST_SETTINGS": json.dumps({**strategy, "TTL": 60})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert eventually(marker.exists, 30), "handle() did not start"
        terminated = observer.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND objsubid = 1 AND classid::bigint = %s AND objid::bigint = %s",
            lock_ids(advisory_key(KEY_PREFIX, f"isolated_echo:{key}")),
        ).fetchall()
        assert terminated == [(True,)]
        _, stderr = command.communicate(timeout=30)
    finally:
        command.kill()
    assert command.returncode == 1, stderr
    assert f"The lock for isolated_echo:{key} was lost while it ran" in stderr


def test_a_wait_whose_timeout_fired_as_the_lock_was_granted_keeps_it(backend, name, monkeypatch):
    """lock_timeout can fire just as the lock is granted: the statement fails, yet the session
    holds the lock. Simulated by a wait statement that takes the lock and then fails as a
    timeout: the waiter claims the lock (its record shows), never leaves it held unknowingly."""
    import psycopg

    from django_isolatable.backends.pgsession import Sessions

    run = Sessions.run

    def granted_then_timed_out(self: Any, connection: Any, sql: str, params: Any = (), **kw: Any):
        if kw.get("waits"):
            connection.execute("SELECT pg_advisory_lock(%s)", (params[1],))
            raise psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
        return run(self, connection, sql, params, **kw)

    monkeypatch.setattr(Sessions, "run", granted_then_timed_out)
    info = new_record(name, "postgres")
    lease = backend.acquire_waiting(name, info, 0.5)
    monkeypatch.undo()
    assert lease is not None
    assert lease.info is info
    assert backend.inspect(name)[0].token == info.token
    assert backend.release(lease) is True
    assert backend.inspect(name) == []


def test_without_psycopg_the_backend_is_a_clean_error_naming_the_extra(tmp_path, monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    from django_isolatable.backends.postgres import PostgresBackend

    monkeypatch.setitem(sys.modules, "psycopg", None)  # import raises ModuleNotFoundError
    with pytest.raises(ImproperlyConfigured) as raised:
        PostgresBackend(BackendOptions(lock_dir=tmp_path, ttl=3, database_alias="postgres"))
    assert str(raised.value) == (
        "The postgres strategy needs the psycopg package: "
        "pip install 'django-isolatable[postgres]'."
    )


def test_a_stuck_postgres_server_loses_its_lock_and_delays_no_other_store(
    settings, make_backend, name
):
    """Issue 13.6, through the engine: a postgres lock behind a server that stopped answering
    and a redis lease in the same process. The postgres guard is reported lost within its TTL;
    the redis lease is renewed all along."""
    services.require("redis")
    proxy = Proxy()
    try:
        with alias_on_port("pg-proxy", proxy.port) as alias:
            settings.ISOLATABLE = {
                "TTL": 1.5, "KEY_PREFIX": KEY_PREFIX, "DATABASE_ALIAS": alias,
                "REDIS_URL": services.REDIS_URL,
            }  # fmt: skip
            from django_isolatable import CommandIsolation

            stuck = CommandIsolation(name, strategy="postgres").lock(timeout=0)
            healthy = CommandIsolation(name, strategy="redis").lock(timeout=0)
            proxy.freeze()
            assert eventually(lambda: stuck.lost, 15), "the stuck postgres lock is not lost"
            assert not healthy.lost
            time.sleep(2)  # past the redis lease's TTL: only renewal keeps it
            assert not healthy.lost
            assert CommandIsolation(name, strategy="redis").holder().token == healthy.info.token
            healthy.release()
            proxy.thaw()
            stuck.release()
    finally:
        proxy.stop()
