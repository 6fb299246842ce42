"""The database strategy's semaphores between real processes, on each database (a SQLite
file, PostgreSQL, MariaDB; the servers skipped when down, see tests/services.py): spawned
processes racing for slots never exceed the count, a SIGKILLed holder's slot is free again at
once (the same-host takeover), and a table of an earlier version gains the new columns."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from django_isolatable import AlreadyRunning, CommandIsolation
from tests import services
from tests.settings import KEY_PREFIX

DATABASES = {"sqlite": None, "postgres": "postgres", "mariadb": "mariadb"}  # alias: service
#: Long enough that a slot freed "at once" cannot have been freed by its lease's expiry.
LONG_TTL = 30.0
SLOTS = 2
spawning = multiprocessing.get_context("spawn")


def _settings(alias: str) -> dict[str, Any]:
    return {
        "STRATEGY": "database",
        "DATABASE_ALIAS": alias,
        "KEY_PREFIX": KEY_PREFIX,
        "TTL": LONG_TTL,
    }


def _set_up_django() -> None:
    """In a spawned process: Django with the test settings (ISOLATABLE from the environment it
    inherited, see ``alias``)."""
    import django

    django.setup()


def _race(name: str, journal: str, start: Any) -> None:
    """Spawned: three threads take slots of ``name`` in turn; each section's interval (one
    monotonic clock for every process) is journalled."""
    import threading

    _set_up_django()
    intervals: list[str] = []

    def work() -> None:
        isolation = CommandIsolation(name, max_holders=SLOTS)
        for _ in range(8):
            with isolation.lock(timeout=60):
                entered = time.monotonic()
                time.sleep(0.01)
                intervals.append(f"{entered!r} {time.monotonic()!r}\n")

    start.wait(60)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(journal).write_text("".join(intervals))


def _hold(name: str, held: Any) -> None:
    """Spawned: take a slot of ``name``, say so, and keep it until killed."""
    _set_up_django()
    guard = CommandIsolation(name, max_holders=SLOTS).try_lock()
    held.send(guard.info.token)
    time.sleep(600)


@pytest.fixture(params=list(DATABASES), ids=list(DATABASES))
def alias(request, settings, django_db_blocker, monkeypatch) -> Iterator[str]:
    """The database, in this process's settings and in those of the processes it spawns."""
    service = DATABASES[request.param]
    if service is not None:
        services.require(service)
    monkeypatch.setenv("ISOLATABLE_TEST_SETTINGS", json.dumps(_settings(request.param)))
    settings.ISOLATABLE = {**settings.ISOLATABLE, **_settings(request.param)}
    with django_db_blocker.unblock():
        CommandIsolation("database-holders:set-up").holder()  # the table, before the race
        yield request.param


@pytest.fixture
def name(request, alias: str) -> Iterator[str]:
    unique = f"database-holders:{request.node.name}:{os.getpid()}:{time.monotonic_ns()}"
    yield unique
    CommandIsolation(unique).release_all()


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    inside = most = 0
    for _, change in events:  # an end sorts before a start at the same instant
        inside += change
        most = max(most, inside)
    return most


def race_for_slots(name: str, tmp_path: Path) -> None:
    """Two spawned processes take slots of ``name`` in turns (``_race``); from their journals,
    never more than ``SLOTS`` inside at once, and nothing left held. The cache strategy's
    tests run it too."""
    start = spawning.Event()
    journals = [tmp_path / f"journal-{n}" for n in range(2)]
    racers = [
        spawning.Process(target=_race, args=(name, str(journal), start)) for journal in journals
    ]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(90)
        assert racer.exitcode == 0
    intervals = [
        (float(begin), float(end))
        for journal in journals
        for begin, end in (line.split() for line in journal.read_text().splitlines())
    ]
    assert len(intervals) == 2 * 3 * 8
    assert _most_at_once(intervals) <= SLOTS
    assert CommandIsolation(name, max_holders=SLOTS).holders() == []


def test_processes_racing_for_slots_never_exceed_the_count(alias, name, tmp_path):
    race_for_slots(name, tmp_path)


def test_a_sigkilled_slot_holders_row_is_freed_at_once(alias, name):
    ours, theirs = spawning.Pipe()
    holder = spawning.Process(target=_hold, args=(name, theirs))
    holder.start()
    try:
        assert ours.poll(60), "the holder took no slot"
        token = ours.recv()
        isolation = CommandIsolation(name, max_holders=SLOTS)
        first = isolation.try_lock()  # the other slot
        with pytest.raises(AlreadyRunning):
            CommandIsolation(name, max_holders=SLOTS).try_lock()
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
        started = time.monotonic()
        second = CommandIsolation(name, max_holders=SLOTS).lock(timeout=10)
        assert time.monotonic() - started < LONG_TTL / 3  # not the lease's expiry
        tokens = {h.token for h in isolation.holders()}
        assert tokens == {first.info.token, second.info.token}
        assert token not in tokens
        first.release()
        second.release()
        assert isolation.holders() == []
        with CommandIsolation(name).try_lock():  # the main row went with the last slot
            pass
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join(30)


def test_a_table_without_the_semaphore_columns_gets_them_on_first_use(
    settings, tmp_path, django_db_blocker
):
    """A table an earlier version created (with ``label``, without ``mode``, ``max_holders``
    and ``lock_hash``) keeps its rows and gains the columns, and the index, on first use."""
    from django_isolatable.models import Lock

    alias = "before-semaphores"
    config = {**connections.settings["sqlite"], "NAME": str(tmp_path / f"{alias}.sqlite3")}
    settings.ISOLATABLE = {"STRATEGY": "database", "DATABASE_ALIAS": alias}
    connections.settings[alias] = config
    try:
        with django_db_blocker.unblock():
            with connections[alias].cursor() as cursor:
                cursor.execute(
                    "CREATE TABLE django_isolatable_lock (name_hash varchar(64) PRIMARY KEY, "
                    "name text NOT NULL, token varchar(64) NOT NULL, pid integer NULL, "
                    "hostname varchar(255) NOT NULL, host_id varchar(255) NOT NULL, "
                    "process_started_at datetime NULL, acquired_at datetime NULL, "
                    "argv text NOT NULL, label varchar(200) NULL, expires_at datetime NOT NULL)"
                )
                cursor.execute(
                    "INSERT INTO django_isolatable_lock VALUES ('x', 'old', 't', 1, 'h', 'i', "
                    "NULL, NULL, '[]', NULL, '2000-01-01 00:00:00')"
                )
            isolation = CommandIsolation("counted", max_holders=3)
            with isolation.try_lock(), isolation.try_lock():
                holders = isolation.holders()
                assert [(h.mode, h.max_holders) for h in holders] == [("semaphore", 3)] * 2
            with CommandIsolation("plain").try_lock():
                assert CommandIsolation("plain").holder().mode == "exclusive"
            connection = connections[alias]
            with connection.cursor() as cursor:
                table = Lock._meta.db_table
                columns = {c.name for c in connection.introspection.get_table_description(
                    cursor, table
                )}  # fmt: skip
                constraints = connection.introspection.get_constraints(cursor, table)
                cursor.execute("SELECT name, mode, max_holders FROM django_isolatable_lock")
                assert cursor.fetchall() == [("old", None, None)]
            assert {"mode", "max_holders", "lock_hash"} <= columns
            assert any(c["columns"] == ["lock_hash"] and c["index"] for c in constraints.values())
            connection.close()
    finally:
        del connections.settings[alias]
        del connections[alias]
