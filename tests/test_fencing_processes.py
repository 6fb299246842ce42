"""Fencing end to end (docs/fencing.md): holder A is SIGSTOPped past its lease, B takes the lock
over, fences and writes; A resumes and fences: its transaction raises ``LockLost`` and its
rows never commit. Real processes, a real lease expiry, on every expiring strategy."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from django.db import connections, transaction

from django_isolatable import CommandIsolation, fence
from tests import services
from tests.test_distributed import (  # noqa: F401 - the fixtures
    EXPIRING,
    Distributed,
    name,
    params,
    spawn,
    strategy,
)

TTL = 1.0
#: Where both holders write, and fence: any database fence() supports.
DATABASE = "postgres"


@pytest.fixture
def table(django_db_blocker):
    services.require(DATABASE)
    table = f"fenced_rows_{uuid.uuid4().hex[:12]}"
    with django_db_blocker.unblock():
        with connections[DATABASE].cursor() as cursor:
            cursor.execute(f"CREATE TABLE {table} (pid integer NOT NULL)")
        yield table
        with connections[DATABASE].cursor() as cursor:
            cursor.execute(f"DROP TABLE {table}")


def rows(table: str) -> list[int]:
    with connections[DATABASE].cursor() as cursor:
        cursor.execute(f"SELECT pid FROM {table} ORDER BY pid")
        return [pid for (pid,) in cursor.fetchall()]


@pytest.mark.parametrize("strategy", params(EXPIRING), indirect=True)
def test_a_holder_paused_past_its_lease_cannot_commit_after_a_newer_holder_fenced(
    strategy: Distributed,  # noqa: F811 - the fixtures imported above
    spawn,  # noqa: F811
    name,  # noqa: F811
    table,
):
    paused = spawn("fenced-write", "--database", DATABASE, "--table", table, ttl=TTL)
    _, paused_token = paused.expect("held")
    os.kill(paused.pid, signal.SIGSTOP)  # a GC pause, swap, a stopped VM: its renewals stop too
    try:
        started = time.monotonic()
        guard = CommandIsolation(name, ttl=TTL).lock(timeout=TTL * 10)  # once the lease ended
        assert time.monotonic() - started >= TTL * 0.5  # it waited for the lease, not less
        with guard:
            assert guard.fencing_token > int(paused_token)
            with transaction.atomic(using=DATABASE):
                with connections[DATABASE].cursor() as cursor:
                    cursor.execute(f"INSERT INTO {table} (pid) VALUES (%s)", [os.getpid()])
                fence(guard, using=DATABASE)
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    paused.send("write")
    assert paused.expect("lost") == [str(guard.fencing_token)]
    assert rows(table) == [os.getpid()]  # the paused holder's row never committed
    paused.expect("released")
