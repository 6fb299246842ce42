"""``fence(guard, using=...)`` on SQLite (a file), PostgreSQL and MariaDB, against the real
servers (skipped when one is down; failing under ISOLATABLE_REQUIRE_SERVICES=1).

The guards here are a minimal stand-in, not real ``LockGuard``s: an object with
``isolation.name`` (plus ``isolation.strategy``, which only messages read) and
``fencing_token``, the only things ``fence()`` reads. The strategies' guards get
``fencing_token`` separately; these tests are about the fence, whatever issued the token.

Each test writes rows into a table of its own in the same transactions as its fences, to see
which transactions committed. Two holders' transactions are interleaved between real processes
(``tests/fenceworker.py``). Everything is cleaned up: the rows table and the fresh databases
the tests make, and the fence table's rows of the tests' own names (the table itself is dropped
at the end of the session if this session created it, tests/services.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from django_isolatable import IsolationError, LockLost, fence
from django_isolatable.backends import dbtable
from tests import services
from tests.processes import EVENT_TIMEOUT, Worker
from tests.settings import KEY_PREFIX, SESSION

FENCE_TABLE = "django_isolatable_fence"
DATABASES = ("sqlite", "postgres", "mariadb")
SERVERS = ("postgres", "mariadb")
#: Is this connection (the server's id of it) blocked on a lock right now?
BLOCKED = {
    "postgresql": (
        "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'"
    ),
    "mysql": (
        "SELECT count(*) FROM information_schema.INNODB_TRX "
        "WHERE trx_mysql_thread_id = %s AND trx_state = 'LOCK WAIT'"
    ),
}
_numbers = itertools.count()
MODULE = "tests.fenceworker"


def guard(name: str, token: Any) -> SimpleNamespace:
    """The stand-in for a ``LockGuard`` holding lock ``name`` with fencing token ``token``."""
    return SimpleNamespace(
        isolation=SimpleNamespace(name=name, strategy="test"), fencing_token=token
    )


def run_sql(alias: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """One statement on a connection of its own, in autocommit: its rows (none for DDL)."""
    connection = connections.create_connection(alias)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params or [])
            return list(cursor.fetchall()) if cursor.description else []
    finally:
        connection.close()


def stored_token(alias: str, name: str) -> int | None:
    key = dbtable.name_hash(KEY_PREFIX, name)
    rows = run_sql(alias, f"SELECT token FROM {FENCE_TABLE} WHERE name_hash = %s", [key])
    return rows[0][0] if rows else None


def wait_until(condition: Callable[[], object], what: str, interval: float = 0.05) -> None:
    """Poll for state no process reports as an event (a statement blocked on a row lock)."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {EVENT_TIMEOUT} s")
        time.sleep(interval)


@pytest.fixture
def prefixed(settings) -> None:
    """The session's KEY_PREFIX, so sessions sharing a server never share a fence."""
    settings.ISOLATABLE = {**settings.ISOLATABLE, "KEY_PREFIX": KEY_PREFIX}


@pytest.fixture(params=DATABASES)
def alias(request, prefixed, django_db_blocker) -> Iterator[str]:
    """Each database in turn (its server reachable)."""
    if request.param in SERVERS:
        services.require(request.param)
    with django_db_blocker.unblock():
        yield request.param
        connections[request.param].close()


@pytest.fixture
def names(alias: str) -> Iterator[Callable[[], str]]:
    """Makes lock names of this test's own; their fence rows are deleted after it."""
    made: list[str] = []

    def new_name() -> str:
        made.append(f"fence-{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield new_name
    if made and FENCE_TABLE in connections[alias].introspection.table_names():
        keys = [dbtable.name_hash(KEY_PREFIX, name) for name in made]
        marks = ", ".join(["%s"] * len(keys))
        run_sql(alias, f"DELETE FROM {FENCE_TABLE} WHERE name_hash IN ({marks})", keys)


@contextlib.contextmanager
def rows_table(alias: str) -> Iterator[str]:
    """A table of this test's own in ``alias``, for the rows its transactions write."""
    table = f"isolatable_fence_rows_{SESSION.replace('-', '_')}_{next(_numbers)}"
    run_sql(alias, f"CREATE TABLE {table} (value varchar(100) NOT NULL)")
    try:
        yield table
    finally:
        run_sql(alias, f"DROP TABLE {table}")


def values(alias: str, table: str) -> list[str]:
    return sorted(value for (value,) in run_sql(alias, f"SELECT value FROM {table}"))


@pytest.fixture
def rows(alias: str) -> Iterator[str]:
    with rows_table(alias) as table:
        yield table


def write(alias: str, table: str, value: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute(f"INSERT INTO {table} (value) VALUES (%s)", [value])


def write_and_fence(alias: str, table: str, value: str, name: str, token: int) -> None:
    """One transaction: write the row ``value``, then fence lock ``name`` with ``token``."""
    with transaction.atomic(using=alias):
        write(alias, table, value)
        fence(guard(name, token), using=alias)


# -- one process ------------------------------------------------------------------------------


def test_a_newer_token_fences_and_an_older_one_is_refused_with_its_writes(alias, names, rows):
    name = names()
    write_and_fence(alias, rows, "newer", name, 7)
    with pytest.raises(LockLost) as lost:
        write_and_fence(alias, rows, "stale", name, 5)
    assert str(lost.value) == (
        f"The lock for {name} was lost: a newer holder fenced token 7, so the writes of this "
        "holder (token 5) must not commit; let this error roll back its transaction."
    )
    error = lost.value
    assert (error.command, error.newer_fencing_token, error.fencing_token) == (name, 7, 5)
    assert values(alias, rows) == ["newer"]
    assert stored_token(alias, name) == 7


def test_the_same_token_fences_again_and_a_greater_one_replaces_it(alias, names):
    name = names()
    for token in (3, 3, 4, 4):
        with transaction.atomic(using=alias):
            fence(guard(name, token), using=alias)
            fence(guard(name, token), using=alias)
    assert stored_token(alias, name) == 4


def test_names_and_key_prefixes_are_fenced_apart(alias, names, settings):
    """A token of one name, or of the same name under another KEY_PREFIX, fences nothing
    else; the row's key is the lock table's for that prefix and name."""
    name, other = names(), names()
    with transaction.atomic(using=alias):
        fence(guard(name, 9), using=alias)
        fence(guard(other, 1), using=alias)
    settings.ISOLATABLE = {**settings.ISOLATABLE, "KEY_PREFIX": f"{KEY_PREFIX}other:"}
    with transaction.atomic(using=alias):
        fence(guard(name, 1), using=alias)
    key = dbtable.name_hash(f"{KEY_PREFIX}other:", name)
    where = f"FROM {FENCE_TABLE} WHERE name_hash = %s"
    other_prefix = run_sql(alias, f"SELECT name, token {where}", [key])
    run_sql(alias, f"DELETE {where}", [key])
    assert other_prefix == [(name, 1)]
    assert (stored_token(alias, name), stored_token(alias, other)) == (9, 1)


def test_fencing_is_one_statement_in_the_caller_transaction(alias, names):
    """Once the table is known, a fence is one statement on the caller's own connection (two
    where the database has no ``INSERT ... RETURNING``: MySQL), refused or not."""
    name = names()
    connection = connections[alias]
    with transaction.atomic(using=alias):
        fence(guard(name, 2), using=alias)  # this process now knows the table
    expected = 1 if connection.features.can_return_columns_from_insert else 2
    with transaction.atomic(using=alias), CaptureQueriesContext(connection) as fenced:
        fence(guard(name, 2), using=alias)
    with (
        pytest.raises(LockLost),
        transaction.atomic(using=alias),
        CaptureQueriesContext(connection) as refused,
    ):
        fence(guard(name, 1), using=alias)
    assert (len(fenced), len(refused)) == (expected, expected), fenced.captured_queries


def test_without_returning_the_fence_reads_the_row_back(alias, names, rows, monkeypatch):
    """Where ``INSERT ... RETURNING`` is missing (MySQL, SQLite before 3.35), the upsert is
    followed by a locking read of the row: two statements, the same outcomes."""
    name = names()
    connection = connections[alias]
    connection.ensure_connection()
    monkeypatch.setitem(connection.features.__dict__, "can_return_columns_from_insert", False)
    write_and_fence(alias, rows, "newer", name, 7)
    with CaptureQueriesContext(connection) as statements, pytest.raises(LockLost) as lost:
        write_and_fence(alias, rows, "stale", name, 5)
    assert lost.value.newer_fencing_token == 7
    fences = [query["sql"] for query in statements.captured_queries if FENCE_TABLE in query["sql"]]
    assert [sql.split()[0] for sql in fences] == ["INSERT", "SELECT"]
    assert values(alias, rows) == ["newer"]


def test_a_thousand_increasing_tokens_of_one_name_all_fence(alias, names):
    """A thousand holders' transactions, one after the other (on SQLite without waiting for
    the disk after each commit: synchronous=OFF, this connection only)."""
    name = names()
    if alias == "sqlite":
        with connections[alias].cursor() as cursor:
            cursor.execute("PRAGMA synchronous = OFF")
    for token in range(1, 1001):
        with transaction.atomic(using=alias):
            fence(guard(name, token), using=alias)
    assert stored_token(alias, name) == 1000
    with pytest.raises(LockLost), transaction.atomic(using=alias):
        fence(guard(name, 999), using=alias)


def test_outside_a_transaction_fencing_is_refused(alias, names):
    name = names()
    with pytest.raises(IsolationError) as refused:
        fence(guard(name, 1), using=alias)
    assert str(refused.value) == (
        f"fence() for {name} must run in the transaction that makes the writes it protects, "
        f"and database {alias!r} is in autocommit mode: call it inside "
        f"`with transaction.atomic(using={alias!r}):`."
    )
    assert not isinstance(refused.value, LockLost)


@pytest.mark.parametrize("token", [None, "7", True, "missing"])
def test_a_guard_without_a_fencing_token_is_refused(alias, names, token):
    name = names()
    holder = guard(name, token)
    if token == "missing":
        del holder.fencing_token
    with pytest.raises(IsolationError) as refused, transaction.atomic(using=alias):
        fence(holder, using=alias)
    assert str(refused.value) == (
        f"Lock {name} has no fencing token: its test strategy does not issue them "
        "(see docs/fencing.md)."
    )


# -- a database without the table ---------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(kind: str, directory: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A new empty database like alias ``kind``'s (a SQLite file, a PostgreSQL schema, a
    MariaDB database), as a new alias; dropped after. Yields the alias and its settings."""
    number = next(_numbers)
    alias, config = f"fresh-{number}", dict(connections.settings[kind])
    schema = f"isolatable_fence_{SESSION.replace('-', '_')}_{number}"
    if kind == "sqlite":
        config["NAME"] = str(directory / f"{alias}.sqlite3")
    elif kind == "postgres":
        run_sql(kind, f"CREATE SCHEMA {schema}")
        config["OPTIONS"] = {**config["OPTIONS"], "options": f"-c search_path={schema}"}
    else:
        run_sql(kind, f"CREATE DATABASE {schema}")
        config["NAME"] = schema
    connections.settings[alias] = config
    try:
        yield alias, config
    finally:
        connections[alias].close()
        del connections.settings[alias]
        with contextlib.suppress(AttributeError):
            del connections[alias]
        if kind == "postgres":
            run_sql(kind, f"DROP SCHEMA {schema} CASCADE")
        elif kind == "mariadb":
            run_sql(kind, f"DROP DATABASE {schema}")


def test_the_first_fence_makes_the_table_and_leaves_the_transaction_whole(alias, tmp_path):
    """On a database without the fence table, the fence that makes it keeps the caller's
    transaction whole: what it wrote before rolls back with it (on MariaDB, making the table
    on the caller's connection would have committed that), and the next fence works."""

    def write_fence_and_fail(fresh: str, table: str) -> None:
        with transaction.atomic(using=fresh):
            write_and_fence(fresh, table, "rolled back", "first", 1)
            raise RuntimeError("the caller's error, after the fence")

    with fresh_database(alias, tmp_path) as (fresh, _), rows_table(fresh) as table:
        with pytest.raises(RuntimeError):
            write_fence_and_fail(fresh, table)
        assert values(fresh, table) == []
        write_and_fence(fresh, table, "committed", "first", 2)
        assert values(fresh, table) == ["committed"]
        assert stored_token(fresh, "first") == 2


# -- two processes ------------------------------------------------------------------------------


@pytest.fixture
def start(tmp_path) -> Iterator[Callable[..., list[Worker]]]:
    """Starts ``count`` ``tests/fenceworker.py`` processes at once (given databases to add),
    once they are ready; kills them after."""
    started: list[Worker] = []

    def start_workers(count: int, databases: dict[str, Any] | None = None) -> list[Worker]:
        env = {
            "ISOLATABLE_TEST_SETTINGS": json.dumps({"KEY_PREFIX": KEY_PREFIX}),
            "FENCE_TEST_DATABASES": json.dumps(databases or {}),
        }
        workers = [
            Worker(tmp_path / f"fenceworker-{len(started) + n}.stderr", env=env, module=MODULE)
            for n in range(count)
        ]
        started.extend(workers)
        for worker in workers:
            worker.expect("ready")
        return workers

    yield start_workers
    for worker in started:
        worker.close()


def tell(worker: Worker, command: str, event: str) -> list[str]:
    worker.send(command)
    return worker.expect(event)


@pytest.mark.parametrize("alias", SERVERS, indirect=True)
def test_an_open_transaction_holds_a_newer_holder_back_then_its_next_fence_is_refused(
    alias, names, rows, start
):
    """Ordering proven: B blocks until A ends, then wins. Holder A fenced token 5 and keeps its
    transaction open; holder B's fence of 6 waits on the fence row (seen blocked in the
    server) while A fences 5 again, which A may, and commits. Then B's fence returns and B
    commits; A's next transaction's fence of 5 is refused and its row never commits."""
    name = names()
    a, b = start(2)
    tell(a, f"begin {alias}", "begun")
    tell(a, f"fence {name} 5", "fenced")
    tell(a, f"write {rows} a-1", "wrote")
    (b_connection,) = tell(b, f"begin {alias}", "begun")
    b.send(f"fence {name} 6")
    blocked = BLOCKED[connections[alias].vendor]
    wait_until(
        lambda: run_sql(alias, blocked, [int(b_connection)])[0][0] == 1,
        "B blocking on A's fence row",
        interval=0.25,  # InnoDB refreshes INNODB_TRX only once unread for 0.1 s
    )
    assert tell(a, f"fence {name} 5", "fenced") == ["5"]
    tell(a, "commit", "committed")
    assert b.expect("fenced") == ["6"]
    tell(b, f"write {rows} b-1", "wrote")
    tell(b, "commit", "committed")

    tell(a, f"begin {alias}", "begun")
    tell(a, f"write {rows} a-2", "wrote")
    assert tell(a, f"fence {name} 5", "lost") == ["6"]
    assert values(alias, rows) == ["a-1", "b-1"]
    assert stored_token(alias, name) == 6


def test_a_paused_holder_fenced_out_by_a_newer_one_never_commits(alias, names, rows, start):
    """Ordering proven: B fences and commits first. Holder A opened its transaction (and, on
    the servers, wrote a row) before it paused; holder B fenced token 6, wrote and committed;
    A resumes and fences 5: ``LockLost``, and A's rows are absent. (On SQLite a transaction
    that wrote holds the file's write lock, so B would wait for A: there A writes after.)"""
    name = names()
    a, b = start(2)
    tell(a, f"begin {alias}", "begun")
    if alias in SERVERS:
        tell(a, f"write {rows} a-1", "wrote")
    tell(b, f"begin {alias}", "begun")
    tell(b, f"fence {name} 6", "fenced")
    tell(b, f"write {rows} b-1", "wrote")
    tell(b, "commit", "committed")
    tell(a, f"write {rows} a-2", "wrote")
    assert tell(a, f"fence {name} 5", "lost") == ["6"]
    assert values(alias, rows) == ["b-1"]


def test_two_processes_racing_on_an_empty_database_both_fence(alias, tmp_path, start):
    """Two processes that fence at once on databases without the fence table both succeed
    (or the smaller token is refused by the greater, if that committed first): neither fails
    because the other was making the table. Several fresh databases, one race each."""
    with contextlib.ExitStack() as stack:
        fresh = dict(stack.enter_context(fresh_database(alias, tmp_path)) for _ in range(4))
        first, second = start(2, fresh)
        for database in fresh:
            first.send(f"once {database} race 1")
            second.send(f"once {database} race 2")
            assert first.event() in (["fenced", "1"], ["lost", "2"])
            assert second.event() == ["fenced", "2"]
        for database in fresh:
            key = dbtable.name_hash(KEY_PREFIX, "race")
            assert run_sql(
                database, f"SELECT token FROM {FENCE_TABLE} WHERE name_hash = %s", [key]
            ) == [(2,)]
        first.close()
        second.close()
