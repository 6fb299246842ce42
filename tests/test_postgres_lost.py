"""Issue 18: a postgres holder whose session ends while ``handle()`` runs (its backend terminated,
its server restarted) reports the lock lost within TTL / 3 + 1 s and exits non-zero, instead of
running on as if it still held the lock; and the lock can be taken again at once.

Real ``manage.py import_data`` processes of the example project (the postgres strategy through
its environment settings, ``DATABASE_URL`` naming the server) against a PostgreSQL server of this
module's own (``tests.private_postgres``): the machine's shared server must never be restarted.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from django_isolatable import CommandIsolation
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.test_command_processes import ManagePy, wait_until

pytest.importorskip("psycopg")

TTL = 3.0
BOUND = TTL / 3 + 1  # seconds from the session's end to the holder's report
WORK = 5  # seconds of import_data's handle(): longer than the bound, with room for a new holder
NAME = "import_data"
ALIAS = "pg-private"
WHY = re.compile(
    rf"Lock {NAME}: its session on PostgreSQL database 'default' ended \((?P<why>[^)]*)\), "
    "and the lock with it"
)
LOST = f"Lost lock {NAME}: its lease expired or was taken while it was held"
EXIT = (
    f"The lock for {NAME} was lost while it ran (its lease expired or was taken); another copy "
    "may be running now."
)


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def isolation(server: PrivatePostgres, settings: Any) -> Iterator[CommandIsolation]:
    """The lock ``import_data`` as the children see it, from this process (alias ``ALIAS``)."""
    from django_isolatable.backends.pgsession import Sessions

    # The shared server's entry (every key Django fills in) pointed at the private server
    connections.settings[ALIAS] = {**connections.settings["postgres"], **server.database()}
    settings.ISOLATABLE = {
        **settings.ISOLATABLE, "STRATEGY": "postgres", "DATABASE_ALIAS": ALIAS, "TTL": TTL,
        "KEY_PREFIX": "",
    }  # fmt: skip
    try:
        yield CommandIsolation(NAME)
    finally:
        Sessions(ALIAS).close()
        del connections.settings[ALIAS]
        with contextlib.suppress(AttributeError):  # this thread's wrapper, if one was made
            del connections[ALIAS]


@pytest.fixture
def manage(server: PrivatePostgres, tmp_path: Path) -> Iterator[Any]:
    """``manage(*args)`` starts ``python manage.py *args`` with the example project's settings,
    the postgres strategy on the private server; every process is killed at teardown."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ISOLATABLE_", "DJANGO_")) and key not in ("LOG_LEVEL",)
    }
    env.update(
        DJANGO_SETTINGS_MODULE="example_project.settings",
        DATABASE_URL=server.url,
        ISOLATABLE_STRATEGY="postgres",
        ISOLATABLE_TTL=str(TTL),
        PYTHONUNBUFFERED="1",
    )
    started: list[ManagePy] = []

    def start(*args: str) -> ManagePy:
        started.append(ManagePy(args, env, tmp_path / "manage"))
        return started[-1]

    yield start
    for run in started:
        if run.running:
            run.process.kill()
        run.process.wait()


def holding_session(run: ManagePy, isolation: CommandIsolation, server: PrivatePostgres) -> int:
    """Wait until ``run`` holds the lock; the server pid of the session that holds it."""
    from django_isolatable.backends.pgholders import advisory_key, lock_ids

    def held_by_run() -> bool:
        holder = isolation.holder()
        return (holder is not None and holder.pid == run.pid) or run._exited_early("locking")

    wait_until(held_by_run, f"{run} taking the lock")
    with server.connect() as observer:
        rows = observer.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND classid::bigint = %s AND objid::bigint = %s",
            lock_ids(advisory_key("", NAME)),
        ).fetchall()
    assert len(rows) == 1, rows
    return int(rows[0][0])


def reported_lost(run: ManagePy, since: float) -> float:
    """Wait for ``run``'s report of the lost lock; seconds from ``since`` to it, at most BOUND."""
    wait_until(lambda: LOST in run.stderr, f"{run} reporting the lock lost", timeout=BOUND + 10)
    took = time.monotonic() - since
    assert took <= BOUND, f"reported lost {took:.2f} s after the session ended, over {BOUND} s"
    return took


def assert_exits_lost(run: ManagePy) -> str:
    """``run`` finishes its work, says the lock was lost and exits 1; why its session ended."""
    assert run.finish() == 1, run.stderr
    assert run.stdout.splitlines()[-2:] == ["import_data: done.", "import_data: cleanup ran."]
    why, lost, exit_line = run.stderr.splitlines()
    match = WHY.fullmatch(why)
    assert match, why
    assert (lost, exit_line) == (LOST, EXIT)
    return match["why"]


def test_a_holder_whose_backend_is_terminated_reports_it_lost_and_exits_1(
    server, isolation, manage
):
    run = manage(NAME, "--seconds", str(WORK))
    session = holding_session(run, isolation, server)
    with server.connect() as observer:
        observer.execute("SELECT pg_terminate_backend(%s, 5000)", (session,))  # waits for it
    reported_lost(run, since=time.monotonic())
    # The lock went with the session: another holder takes it while the first still works
    with isolation.lock(timeout=0):
        assert run.running
    assert assert_exits_lost(run) == "terminating connection due to administrator command"


@pytest.mark.parametrize("outage", ["restart", "down-for-a-while"])
def test_a_holder_whose_server_restarts_reports_it_lost_and_a_new_holder_takes_the_lock(
    server, isolation, manage, outage
):
    """A restart (pg_ctl's fast shutdown terminates every session), or a server that crashes
    and stays down longer than the bound (a failover that takes a while): the holder's next
    check fails either way."""
    run = manage(NAME, "--seconds", str(WORK))
    holding_session(run, isolation, server)
    ended = time.monotonic()
    if outage == "restart":
        server.restart()  # returns once the server serves again
    else:
        server.stop()
        reported_lost(run, ended)
        server.start()
    reported_lost(run, ended)
    # A new holder takes the lock while the first still works (this process's pooled sessions
    # died with the server too: it takes new ones), and so does a new run of the command
    with isolation.lock(timeout=0):
        assert run.running
    second = manage(NAME, "--seconds", "0")
    assert second.finish() == 0, second.stderr
    assert second.stdout.splitlines()[-2:] == ["import_data: done.", "import_data: cleanup ran."]
    why = assert_exits_lost(run)
    if outage == "restart":
        assert why == "terminating connection due to administrator command"
