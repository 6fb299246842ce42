"""The postgres strategy's semaphore slots and shared holds (backends/pgholders.py) beyond the
conformance suite: real processes SIGKILLed while they hold, one statement per operation, a
failed attempt that leaves its session holding nothing, and takers of two counts that race."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_isolatable import AlreadyRunning, CommandIsolation, IsolationError
from django_isolatable.backends import BackendOptions, Lease
from django_isolatable.holders import LockInfo, new_record
from tests import services
from tests.processes import Worker, Workers
from tests.settings import KEY_PREFIX

pytest.importorskip("psycopg")

SETTINGS = {"STRATEGY": "postgres", "DATABASE_ALIAS": "postgres", "KEY_PREFIX": KEY_PREFIX}


@pytest.fixture
def name(request) -> str:
    return f"{request.node.name}-{time.monotonic_ns()}"


@pytest.fixture
def backend(tmp_path, settings, django_db_blocker) -> Iterator[Any]:
    """A postgres backend on the test server; every lease it hands out is released after."""
    from django_isolatable.backends.postgres import PostgresBackend

    services.require("postgres")
    settings.ISOLATABLE = {**settings.ISOLATABLE, **SETTINGS}
    options = BackendOptions(
        lock_dir=tmp_path, ttl=3, key_prefix=KEY_PREFIX, database_alias="postgres"
    )
    made = PostgresBackend(options)
    leases: list[Lease] = []
    for method in ("acquire", "acquire_waiting", "acquire_slot", "acquire_shared"):
        setattr(made, method, _recording(getattr(made, method), leases))
    with django_db_blocker.unblock():
        yield made
    for lease in leases:
        with contextlib.suppress(Exception):
            made.release(lease)


def _recording(method: Callable[..., Any], leases: list[Lease]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        lease = method(*args)
        if lease is not None:
            leases.append(lease)
        return lease

    return call


def slot(name: str, count: int) -> LockInfo:
    return new_record(name, "postgres", mode="semaphore", max_holders=count)


def shared(name: str) -> LockInfo:
    return new_record(name, "postgres", mode="shared")


@pytest.fixture
def spawn(name, tmp_path, lock_dir, backend) -> Iterator[Callable[..., Worker]]:
    workers = Workers(tmp_path, name, lock_dir)
    env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(SETTINGS)}
    yield lambda *options: workers.start("hold", *options, env=env)
    workers.close()


def taken_within(take: Callable[[], Any], seconds: float) -> Any:
    """What ``take`` returned once it did not raise AlreadyRunning, within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return take()
        except AlreadyRunning:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_sigkilled_slot_holder_frees_its_slot_at_once(spawn, name):
    worker = spawn("--max-holders", "2")
    _pid, token = worker.expect("held")
    isolation = CommandIsolation(name, max_holders=2)
    with isolation.try_lock() as mine:
        assert sorted(h.token for h in isolation.holders()) == sorted([token, mine.info.token])
        with pytest.raises(AlreadyRunning):
            isolation.try_lock()
        worker.kill()  # its session ends with its connection: the slot is free at once
        taken_within(isolation.try_lock, 3.0).release()
    assert isolation.holders() == []


def test_a_sigkilled_shared_holder_frees_the_lock_at_once(spawn, name):
    worker = spawn("--shared")
    worker.expect("held")
    isolation = CommandIsolation(name)
    with isolation.try_lock(shared=True):  # beside it
        pass
    with pytest.raises(AlreadyRunning) as raised:
        isolation.try_lock()
    assert (raised.value.holder.mode, raised.value.holder.pid) == ("shared", worker.pid)
    worker.kill()
    taken_within(isolation.try_lock, 3.0).release()
    assert isolation.holders() == []


def test_each_slot_and_shared_operation_is_one_statement(backend, name, monkeypatch):
    import psycopg

    statements: list[str] = []
    execute = psycopg.Connection.execute

    def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        statements.append(query)
        return execute(self, query, *args, **kwargs)

    takes = [
        lambda: backend.acquire_slot(name, slot(name, 3), 3),
        lambda: backend.acquire_shared(name, shared(name)),
    ]
    for take in takes * 2:  # the connection opens and gets into the pool first
        backend.release(take())
    monkeypatch.setattr(psycopg.Connection, "execute", counted)
    for take in takes:
        texts = []
        for _ in range(2):
            lease = take()
            assert backend.refresh(lease, 3.0) is True
            assert backend.release(lease) is True
            texts.append(statements[:])
            statements.clear()
        assert len(texts[0]) == 3
        assert texts[0] == texts[1]


def held_by_the_pool(observer_rows: Callable[[str, Any], list[Any]]) -> list[Any]:
    from django_isolatable.backends.pgsession import _idle

    pids = [connection.info.backend_pid for connection in _idle.get("postgres", [])]
    return observer_rows(
        "SELECT pid, objid, mode FROM pg_locks WHERE locktype = 'advisory' AND pid = ANY(%s)",
        (pids,),
    )


@pytest.fixture
def observer_rows(backend) -> Iterator[Callable[[str, Any], list[Any]]]:
    import psycopg

    host, port = services.SERVERS["postgres"]
    from django.db import connections

    settings = connections.settings["postgres"]
    connection = psycopg.connect(
        host=host, port=port, user=settings["USER"], dbname=settings["NAME"], autocommit=True
    )
    yield lambda sql, params: connection.execute(sql, params).fetchall()
    connection.close()


def test_a_failed_attempt_leaves_its_session_holding_nothing(backend, name, observer_rows):
    plain = backend.acquire(name, new_record(name, "postgres"))
    assert backend.acquire_slot(name, slot(name, 2), 2) is None
    assert backend.acquire_shared(name, shared(name)) is None
    backend.release(plain)
    held = [backend.acquire_slot(name, slot(name, 2), 2) for _ in range(2)]
    pids = [lease.connection.info.backend_pid for lease in held]
    rows = observer_rows(
        "SELECT pid, count(*) FROM pg_locks WHERE pid = ANY(%s) GROUP BY pid", (pids,)
    )
    # its count lock, the semaphore marker, the name's key, one slot
    assert sorted(rows) == sorted((pid, 4) for pid in pids)
    assert backend.acquire_slot(name, slot(name, 2), 2) is None  # full
    with pytest.raises(IsolationError, match="max_holders=2"):
        backend.acquire_slot(name, slot(name, 3), 3)
    with pytest.raises(IsolationError, match="max_holders=2"):
        backend.acquire_shared(name, shared(name))
    assert held_by_the_pool(observer_rows) == []
    for lease in held:
        assert backend.release(lease) is True
    assert held_by_the_pool(observer_rows) == []
    assert backend.inspect(name) == []


def race(takes: list[Callable[[str], Lease | None]], lock: str) -> list[Lease]:
    """Run ``takes`` of ``lock`` in threads at once; the leases they got (a mismatch is
    none)."""
    barrier = threading.Barrier(len(takes))
    leases: list[Lease] = []

    def take(attempt: Callable[[str], Lease | None]) -> None:
        barrier.wait()
        with contextlib.suppress(IsolationError):
            lease = attempt(lock)
            if lease is not None:
                leases.append(lease)

    threads = [threading.Thread(target=take, args=(attempt,)) for attempt in takes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return leases


def test_takers_of_two_counts_racing_never_both_hold(backend, name):
    """Each round, two threads take a free name at once, with different counts (or one a shared
    hold): at most one of them holds after."""
    kinds: list[Callable[[str], Lease | None]] = [
        lambda lock: backend.acquire_slot(lock, slot(lock, 2), 2),
        lambda lock: backend.acquire_slot(lock, slot(lock, 3), 3),
        lambda lock: backend.acquire_shared(lock, shared(lock)),
    ]
    for first, second in [(0, 1), (0, 2), (1, 2)]:
        for round_number in range(15):
            lock = f"{name}-{first}{second}-{round_number}"
            held = race([kinds[first], kinds[second]], lock)
            assert len(held) <= 1, [lease.info.mode for lease in held]
            for lease in held:
                backend.release(lease)


def test_force_release_with_a_token_frees_only_that_slot(backend, name):
    first = backend.acquire_slot(name, slot(name, 2), 2)
    second = backend.acquire_slot(name, slot(name, 2), 2)
    assert backend.force_release(name, first.token) is True
    assert [h.token for h in backend.inspect(name)] == [second.token]
    assert backend.refresh(first, 3.0) is False
    assert backend.refresh(second, 3.0) is True
    assert backend.acquire_slot(name, slot(name, 2), 2) is not None  # the freed slot
    assert backend.force_release(name) is True
    assert backend.inspect(name) == []


@pytest.mark.parametrize("tricky", ["/* x */ SELECT 1; --", "%s"])
def test_a_tricky_name_holds_slots_and_shared_holds_and_reads_back(backend, name, tricky):
    name = f"{name}{tricky}"
    info = slot(name, 2)
    lease = backend.acquire_slot(name, info, 2)
    assert backend.inspect(name) == [dataclasses.replace(info, alive=True)]
    assert [i.token for i in backend.list() if i.name == name] == [info.token]
    assert backend.release(lease) is True
    info = shared(name)
    lease = backend.acquire_shared(name, info)
    assert backend.inspect(name) == [dataclasses.replace(info, alive=True)]
    assert backend.release(lease) is True


def test_takers_of_one_count_racing_all_get_a_hold(backend, name):
    """Five takers of a semaphore of five at once, or five shared holds: none is refused (the
    markers they try exclusively never fail one of them)."""
    for round_number in range(10):
        lock = f"{name}-{round_number}"
        semaphore = race([lambda lock: backend.acquire_slot(lock, slot(lock, 5), 5)] * 5, lock)
        held = race([lambda lock: backend.acquire_shared(lock, shared(lock))] * 5, f"{lock}-s")
        assert (len(semaphore), len(held)) == (5, 5)
        for lease in semaphore + held:
            backend.release(lease)
