"""The distributed strategies between real processes: redis, postgres, database, cache.

Each test runs once per distributed strategy (``STRATEGIES``: redis; postgres; the database
strategy on PostgreSQL, MariaDB and a SQLite file; the cache strategy on Django's RedisCache)
against the real servers, skipping when one is down (failing under
ISOLATABLE_REQUIRE_SERVICES=1). Workers (``tests/workers.py``) get the strategy's settings
through ``ISOLATABLE_TEST_SETTINGS`` and report events on stdout, so the tests await events and
never sleep to let something happen. Time bounds are generous: they catch a lock that hangs or
a guarantee that broke, not one that is slow. Every test releases what it took and kills its
workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import caches
from django.db import connections

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    IsolationError,
    LockGuard,
    LockIOError,
    LockLost,
)
from django_isolatable.backends import Lease, load_backend_class
from django_isolatable.holders import new_record
from django_isolatable.signals import lock_lost
from tests import services
from tests.processes import (
    EVENT_TIMEOUT,
    ROOT,
    Worker,
    Workers,
    assert_exclusive_counting,
    run_counting_workers,
)
from tests.settings import KEY_PREFIX

HOSTNAME = socket.gethostname()
#: The lease of workers whose lease is not the point of the test: long, so that "at once" and
#: "before the TTL" are far apart.
LONG_TTL = 30.0
#: Short leases, for the tests that wait for one to expire or to be renewed a few times.
EXPIRY_TTL = 2.0
RENEWAL_TTL = 1.5
#: A host_id no process of this host has: its holders can never be judged dead from here.
ANOTHER_HOST = "boot=00000000-0000-0000-0000-000000000000 pid:[1]"
UNREACHABLE_REDIS = "redis://:secret@127.0.0.1:1/0"


@dataclass(frozen=True)
class Distributed:
    """A distributed strategy as these tests configure it (its ISOLATABLE settings)."""

    id: str
    settings: dict[str, Any]
    #: The server it needs (see tests/services.py), if any.
    service: str | None

    @property
    def strategy(self) -> str:
        return str(self.settings["STRATEGY"])

    @property
    def expiring(self) -> bool:
        return load_backend_class(self.strategy).expiring

    def worker_env(self, ttl: float = LONG_TTL) -> dict[str, str]:
        """The environment that gives a spawned process these settings, with lease ``ttl``."""
        return {"ISOLATABLE_TEST_SETTINGS": json.dumps({**self.settings, "TTL": ttl})}


STRATEGIES = [
    Distributed(
        "redis",
        {"STRATEGY": "redis", "REDIS_URL": services.REDIS_URL, "KEY_PREFIX": KEY_PREFIX},
        "redis",
    ),
    Distributed(
        "postgres",
        {"STRATEGY": "postgres", "DATABASE_ALIAS": "postgres", "KEY_PREFIX": KEY_PREFIX},
        "postgres",
    ),
    Distributed(
        "database-postgres",
        {"STRATEGY": "database", "DATABASE_ALIAS": "postgres", "KEY_PREFIX": KEY_PREFIX},
        "postgres",
    ),
    Distributed(
        "database-mariadb",
        {"STRATEGY": "database", "DATABASE_ALIAS": "mariadb", "KEY_PREFIX": KEY_PREFIX},
        "mariadb",
    ),
    Distributed(
        "database-sqlite",
        {"STRATEGY": "database", "DATABASE_ALIAS": "sqlite", "KEY_PREFIX": KEY_PREFIX},
        None,
    ),
    Distributed(
        "cache-redis",
        {"STRATEGY": "cache", "CACHE_ALIAS": "redis", "KEY_PREFIX": KEY_PREFIX},
        "redis",
    ),
]
EXPIRING = [strategy for strategy in STRATEGIES if strategy.expiring]
BY_ID = {strategy.id: strategy for strategy in STRATEGIES}


def ids(strategy: Distributed) -> str:
    return strategy.id


def params(strategies: list[Distributed]) -> list[Any]:
    """``strategies`` as pytest params, named by their ids."""
    return [pytest.param(s, id=s.id) for s in strategies]


@pytest.fixture(params=STRATEGIES, ids=ids)
def strategy(request, settings, django_db_blocker) -> Iterator[Distributed]:
    """This test's strategy, in this process's settings too (its server required)."""
    distributed: Distributed = request.param
    if distributed.service is not None:
        services.require(distributed.service)
    settings.ISOLATABLE = {**settings.ISOLATABLE, **distributed.settings}
    # The database strategies use connections of their own, not pytest-django's test ones.
    with django_db_blocker.unblock():
        # Set the store up (the database strategy creates its table) before processes race on
        # it: first use is test_first_users_of_an_empty_database_all_get_the_lock's subject.
        CommandIsolation("distributed:set-up").holder()
        yield distributed


@pytest.fixture
def name(request, strategy: Distributed) -> Iterator[str]:
    """A lock name of this test's own; whatever holds it at the end is force-released."""
    unique = f"distributed:{request.node.name}:{os.getpid()}:{time.monotonic_ns()}"
    yield unique
    CommandIsolation(unique).release_all()  # what a killed holder or a test failure left behind


@pytest.fixture
def spawn(
    strategy: Distributed, name: str, tmp_path: Path, lock_dir: Path
) -> Iterator[Callable[..., Worker]]:
    """``spawn(command, *options, ttl=LONG_TTL)`` starts a worker on ``name`` with the
    strategy's settings and lease ``ttl``. Workers still running at the end are killed."""
    workers = Workers(tmp_path, name, lock_dir)

    def start(command: str, *options: str, ttl: float = LONG_TTL) -> Worker:
        return workers.start(command, *options, env=strategy.worker_env(ttl))

    yield start
    workers.close()


def manage_locks(strategy: Distributed, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python manage.py locks *args`` in a new process with the strategy's settings."""
    return subprocess.run(
        [sys.executable, "manage.py", "locks", *args],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **strategy.worker_env()},
        capture_output=True,
        text=True,
        timeout=EVENT_TIMEOUT,
        check=False,
    )


def status_of(strategy: Distributed, name: str) -> dict[str, Any]:
    """``manage.py locks status NAME --json``'s one row."""
    status = manage_locks(strategy, "status", name, "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert row["name"] == name
    assert row["strategy"] == strategy.strategy
    return row


def wait_until(
    condition: Callable[[], object], what: str, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``condition`` every ``interval`` s until it is true; fail after ``timeout`` s saying
    ``what`` never happened. For state that no process reports as an event (a server noticing
    a dead peer, a statement blocking on a row lock)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def take_and_release(
    name: str, outcomes: queue.Queue[object], start: threading.Barrier | None = None
) -> None:
    """A thread's work: (after ``start``) wait for ``name``'s lock, take it, release it; put
    "acquired", or the ``IsolationError`` raised instead, into ``outcomes``."""
    isolation = CommandIsolation(name)
    if start is not None:
        start.wait()
    try:
        with isolation.lock(timeout=EVENT_TIMEOUT):
            outcomes.put("acquired")
    except IsolationError as error:
        outcomes.put(error)
    finally:
        isolation.backend.close()  # this thread's connection


@contextlib.contextmanager
def extra_alias(handler: Any, alias: str, config: dict[str, Any]) -> Iterator[None]:
    """``config`` as alias ``alias`` of ``handler`` (``connections`` or ``caches``) for the
    duration: ``override_settings`` does not reach the aliases these handlers already read."""
    handler.settings[alias] = config
    try:
        yield
    finally:
        del handler.settings[alias]
        with contextlib.suppress(AttributeError):  # this thread's client, if one was made
            del handler[alias]


# -- taking a lock away behind its holder's back, per store ---------------------------------


def run_sql(alias: str, sql: str, params: list[Any]) -> int:
    """Run one statement on a fresh connection of its own; the number of rows it touched (or
    returned)."""
    connection = connections.create_connection(alias)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return int(cursor.rowcount)
    finally:
        connection.close()


def take_away(strategy: Distributed, name: str, guard: LockGuard) -> None:
    """Remove ``guard``'s lock from the store behind its holder's back, as an operator or a
    failover would: another ``CommandIsolation`` force-releases it (deletes the redis key, the
    cache entry or the table row, or ends the PostgreSQL session)."""
    operator = CommandIsolation(name)
    try:
        assert operator.release_all(), f"found no {strategy.id} lock to take away"
    finally:
        operator.backend.close()


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    params(STRATEGIES),
    indirect=True,
)
def test_one_holder_at_a_time_among_eight_processes(strategy, spawn, tmp_path):
    """8 processes x 40 racy read-modify-write increments inside the lock: no update is lost
    and no two critical sections overlap."""
    journals = run_counting_workers(spawn, tmp_path, 8, "--iterations", "40", "--timeout", "60")
    assert_exclusive_counting(journals, tmp_path / "counter", 8 * 40)


#: One row per session of a test's waiters that is blocked on a row lock, per vendor.
BLOCKED_WAITERS = {
    "postgresql": (
        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND position(%s in query) > 0"
    ),
    "mysql": (
        "SELECT trx_id FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT' "
        "AND LOCATE(%s, trx_query) > 0"
    ),
}


@pytest.mark.parametrize(
    "strategy",
    params([BY_ID["database-postgres"], BY_ID["database-mariadb"]]),
    indirect=True,
)
def test_waiters_racing_a_release_get_the_lock_in_turn(strategy, name):
    """Two waiters whose attempts queue behind a release in progress (its DELETE has locked
    the row and not committed yet) both get the lock, one after the other: contention between
    attempts is never an error. The test holds the release open on a connection of its own,
    so the race that contending processes meet now and then happens every time."""
    alias = strategy.settings["DATABASE_ALIAS"]
    record = new_record(name, strategy.strategy, ttl=LONG_TTL)
    assert CommandIsolation(name).backend.acquire(name, record) is not None
    releasing = connections.create_connection(alias)
    releasing.set_autocommit(False)
    with releasing.cursor() as cursor:
        cursor.execute("DELETE FROM django_isolatable_lock WHERE token = %s", [record.token])

    outcomes: queue.Queue[object] = queue.Queue()
    waiters = [threading.Thread(target=take_and_release, args=(name, outcomes)) for _ in "ab"]
    try:
        for waiter in waiters:
            waiter.start()
        blocked = BLOCKED_WAITERS[releasing.vendor]
        # InnoDB refreshes INNODB_TRX only once it has not been read for 0.1 s: poll slower.
        wait_until(
            lambda: run_sql(alias, blocked, [name]) == 2,
            "both waiters blocking behind the release",
            interval=0.25,
        )
    finally:
        releasing.commit()  # the release completes: now both waiters go for the free lock
        releasing.close()
    for waiter in waiters:
        waiter.join(EVENT_TIMEOUT)
    assert [outcomes.get_nowait() for _ in waiters] == ["acquired", "acquired"]


def test_first_users_of_an_empty_database_all_get_the_lock(settings, tmp_path, django_db_blocker):
    """Eight first users of a brand-new database (a SQLite file: the servers are shared, their
    table cannot be dropped) all get the lock in turn; none fails because the lock table was
    missing when it looked, whoever created it. Threads with a connection each race like
    processes and start together; the losing interleaving is a matter of timing (a third of
    fresh databases here), so the test tries up to 30 fresh databases."""
    for attempt in range(30):
        alias = f"fresh-{attempt}"
        config = {**connections.settings["sqlite"], "NAME": str(tmp_path / f"{alias}.sqlite3")}
        settings.ISOLATABLE = {"STRATEGY": "database", "DATABASE_ALIAS": alias}
        outcomes: queue.Queue[object] = queue.Queue()
        start = threading.Barrier(8)
        with django_db_blocker.unblock(), extra_alias(connections, alias, config):
            users = [
                threading.Thread(target=take_and_release, args=("first-use", outcomes, start))
                for _ in range(8)
            ]
            for user in users:
                user.start()
            for user in users:
                user.join(EVENT_TIMEOUT)
        assert [outcomes.get_nowait() for _ in users] == ["acquired"] * 8, f"database {attempt}"


def test_a_lock_table_without_the_label_column_gets_it_on_first_use(
    settings, tmp_path, django_db_blocker
):
    """A table an earlier version created, without ``label``, keeps its rows and gains the
    column when a lock first needs it."""
    alias = "before-labels"
    config = {**connections.settings["sqlite"], "NAME": str(tmp_path / f"{alias}.sqlite3")}
    settings.ISOLATABLE = {"STRATEGY": "database", "DATABASE_ALIAS": alias}
    with django_db_blocker.unblock(), extra_alias(connections, alias, config):
        with connections[alias].cursor() as cursor:
            cursor.execute(
                "CREATE TABLE django_isolatable_lock (name_hash varchar(64) PRIMARY KEY, "
                "name text NOT NULL, token varchar(64) NOT NULL, pid integer NULL, "
                "hostname varchar(255) NOT NULL, host_id varchar(255) NOT NULL, "
                "process_started_at datetime NULL, acquired_at datetime NULL, "
                "argv text NOT NULL, expires_at datetime NOT NULL)"
            )
            cursor.execute(
                "INSERT INTO django_isolatable_lock VALUES ('x', 'old', 't', 1, 'h', 'i', "
                "NULL, NULL, '[]', '2000-01-01 00:00:00')"
            )
        with CommandIsolation("labelled", label="nightly").lock() as guard:
            assert CommandIsolation("labelled").holder().label == "nightly"
        assert guard.info.label == "nightly"
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT name, label FROM django_isolatable_lock WHERE name_hash = 'x'")
            assert cursor.fetchall() == [("old", None)]
        connections[alias].close()


def test_only_the_owner_releases(strategy, spawn, name):
    """Releasing another process's lock with a lease that has the wrong token does nothing:
    ``release`` returns False and the worker still holds the lock."""
    holder = spawn("hold")
    pid, token = holder.expect("held")
    isolation = CommandIsolation(name)
    record = isolation.holder()
    assert record is not None
    assert (record.pid, record.token) == (int(pid), token)

    assert isolation.backend.release(Lease(name, "some-other-token", record)) is False
    with pytest.raises(AlreadyRunning) as caught:
        isolation.try_lock()
    assert caught.value.holder.pid == int(pid)

    holder.finish()
    assert holder.expect("released") == []
    isolation.try_lock().release()


@pytest.mark.parametrize("strategy", EXPIRING, ids=ids, indirect=True)
def test_an_abandoned_lease_is_taken_over_after_its_ttl_only(strategy, name):
    """A lease whose holder vanished without releasing, on a host where it cannot be judged dead
    (so only expiry can free it, and no heartbeat renews it), blocks others until its TTL is
    over, and then is taken over; the abandoned lease can no longer release the new holder."""
    isolation = CommandIsolation(name, ttl=EXPIRY_TTL)
    record = replace(
        new_record(name, strategy.strategy, ttl=EXPIRY_TTL),
        hostname="another-host",
        host_id=ANOTHER_HOST,
    )
    granted_at = time.monotonic()
    abandoned = isolation.backend.acquire(name, record)
    assert abandoned is not None

    with pytest.raises(AlreadyRunning) as caught:
        isolation.try_lock()
    assert time.monotonic() - granted_at < EXPIRY_TTL, "too slow to test before the expiry"
    assert caught.value.holder.token == record.token
    assert caught.value.holder.alive is None  # another host's holder: cannot tell

    with isolation.lock(timeout=EXPIRY_TTL * 3) as guard:
        assert time.monotonic() - granted_at >= EXPIRY_TTL * 0.95, "the lease ended early"
        assert isolation.backend.release(abandoned) is False
        assert isolation.holder().token == guard.info.token


def test_renewal_keeps_a_long_jobs_lease(strategy, spawn, name):
    """A holder with a 1.5 s lease keeps it for 2 x TTL (renewed every TTL/3): a waiting process
    times out, the lock is still the holder's, and its guard is not lost."""
    holder = spawn("hold", ttl=RENEWAL_TTL)
    pid, token = holder.expect("held")
    held_since = time.monotonic()
    waiter = spawn("wait", "--timeout", str(2 * RENEWAL_TTL), ttl=RENEWAL_TTL)
    waiter.expect("waiting")
    waiter.expect("timeout", timeout=2 * RENEWAL_TTL + EVENT_TIMEOUT)
    assert time.monotonic() - held_since > 2 * RENEWAL_TTL

    with pytest.raises(AlreadyRunning) as caught:
        CommandIsolation(name).try_lock()
    assert (caught.value.holder.pid, caught.value.holder.token) == (int(pid), token)
    holder.send("lost?")
    assert holder.expect("lost") == ["False"]
    holder.finish()


def test_a_lost_lease_is_detected_signalled_and_released_quietly(strategy, name):
    """When the store loses a held lock (its key deleted, its row deleted, its session ended),
    the heartbeat notices within about one renewal interval (TTL/3): ``guard.lost`` turns True,
    ``check()`` raises ``LockLost``, ``lock_lost`` is sent, and ``release()`` afterwards raises
    nothing and leaves the next holder's lock alone."""
    received: list[dict[str, Any]] = []
    signalled = threading.Event()

    def on_lock_lost(sender: object, **kwargs: Any) -> None:
        if kwargs["name"] == name:
            received.append({"sender": sender, **kwargs})
            signalled.set()

    isolation = CommandIsolation(name, ttl=RENEWAL_TTL)
    lock_lost.connect(on_lock_lost, weak=False)
    try:
        guard = isolation.try_lock()
        assert guard.lost is False
        take_away(strategy, name, guard)
        assert signalled.wait(RENEWAL_TTL / 3 + 5), "lock_lost was never sent"
    finally:
        lock_lost.disconnect(on_lock_lost)

    assert guard.lost is True
    with pytest.raises(LockLost):
        guard.check()
    assert [(r["sender"], r["name"], r["guard"]) for r in received] == [(isolation, name, guard)]
    with isolation.try_lock() as successor:
        guard.release()
        assert isolation.holder().token == successor.info.token


def test_a_lock_lost_before_its_first_renewal_is_reported_at_release(strategy, name):
    """A lock taken away before any renewal was due (a run shorter than TTL/3): the release
    finds it gone, so the guard is lost and ``lock_lost`` is sent once, as for a lease the
    heartbeat found lost; someone else may have run meanwhile."""
    received: list[LockGuard] = []

    def on_lock_lost(sender: object, **kwargs: Any) -> None:
        if kwargs["name"] == name:
            received.append(kwargs["guard"])

    isolation = CommandIsolation(name, ttl=LONG_TTL)
    lock_lost.connect(on_lock_lost, weak=False)
    try:
        guard = isolation.try_lock()
        take_away(strategy, name, guard)
        assert guard.lost is False, "a renewal found it: this test is about the release"
        guard.release()
        guard.release()  # idempotent: reported once
    finally:
        lock_lost.disconnect(on_lock_lost)
    assert guard.lost is True
    assert received == [guard]


def test_a_raising_lock_lost_receiver_leaves_the_other_leases_renewed(strategy, name, caplog):
    """A ``lock_lost`` receiver that raises is logged; the process's other leases are still
    renewed (a broken receiver once killed the renewal thread, and every lease then expired)."""

    def broken(sender: object, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    kept = CommandIsolation(f"{name}:kept", ttl=RENEWAL_TTL)
    lock_lost.connect(broken, weak=False)
    try:
        with caplog.at_level("ERROR", logger="django_isolatable"):
            lost_guard = CommandIsolation(name, ttl=RENEWAL_TTL).try_lock()
            kept_guard = kept.try_lock()
            take_away(strategy, name, lost_guard)
            wait_until(lambda: lost_guard.lost, "the lost lease's report", RENEWAL_TTL + 5)
            deadline = time.monotonic() + 2 * RENEWAL_TTL
            while time.monotonic() < deadline:  # two leases' worth: renewed, or taken
                with pytest.raises(AlreadyRunning):
                    CommandIsolation(kept.name).try_lock()
                time.sleep(RENEWAL_TTL / 4)
        assert kept_guard.lost is False
        assert "receiver bug" in caplog.text
        kept_guard.release()
        lost_guard.release()
    finally:
        lock_lost.disconnect(broken)
        kept.release_all()


def test_a_command_whose_lock_was_taken_away_mid_run_exits_non_zero(strategy, name):
    """Just after a two-second run with the default TTL took its lock, the lock is
    force-released and could be taken by a second copy: the first run must not exit 0 as if it
    ran alone."""
    lock_name = f"isolated_echo:{name}"
    run = subprocess.Popen(
        [sys.executable, "manage.py", "isolated_echo", "--key", name, "--seconds", "2"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **strategy.worker_env(60)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: CommandIsolation(lock_name).is_locked(), "the command's lock")
        take_away(strategy, lock_name, None)  # type: ignore[arg-type]
        stdout, stderr = run.communicate(timeout=EVENT_TIMEOUT)
    finally:
        run.kill()
        CommandIsolation(lock_name).release_all()
    assert f"echo {name}" in stdout  # handle() ran to its end
    assert run.returncode == 1, stderr
    assert f"The lock for {lock_name} was lost while it ran" in stderr


def test_a_sigkilled_holders_lock_is_recovered_well_before_its_ttl(strategy, spawn, name):
    """A holder killed with SIGKILL frees the lock for a waiting process within seconds, not
    after its 30 s lease: postgres because its session ends, the expiring strategies because
    the holder ran on this host and its pid is gone."""
    holder = spawn("hold")
    holder.expect("held")
    waiter = spawn("wait", "--timeout", str(LONG_TTL))
    waiter.expect("waiting")
    killed_at = time.monotonic()
    holder.kill()
    acquired_at, waiter_pid, _token = waiter.expect("acquired", timeout=LONG_TTL / 3)
    assert float(acquired_at) - killed_at < 3.0
    assert CommandIsolation(name).holder().pid == int(waiter_pid) == waiter.pid
    waiter.finish()


def test_locks_status_and_release_of_a_sigkilled_holder(strategy, spawn, name):
    """``manage.py locks status --json`` in another process shows a worker's lock as held with
    its pid; once the worker is SIGKILLed, an expiring strategy's record stays until its TTL
    and shows as stale (postgres: the lock is simply free), and ``locks release NAME`` without
    ``--force`` clears it."""
    holder = spawn("hold")
    pid, _token = holder.expect("held")
    row = status_of(strategy, name)
    assert (row["state"], row["pid"], row["host"]) == ("held", int(pid), HOSTNAME)

    holder.kill()
    isolation = CommandIsolation(name)
    wait_until(lambda: not isolation.is_locked(), "the killed holder's lock being seen as free")
    row = status_of(strategy, name)
    if strategy.expiring:
        assert (row["state"], row["pid"]) == ("stale", int(pid))
    else:
        assert row["state"] == "free"

    release = manage_locks(strategy, "release", name)
    assert release.returncode == 0, release.stderr
    if strategy.expiring:
        assert release.stdout == f"Released stale lock {name} (pid {pid} on {HOSTNAME}).\n"
    else:
        assert release.stdout == f"{name} is not locked.\n"
    assert isolation.holder() is None
    assert status_of(strategy, name)["state"] == "free"


def test_locks_release_refuses_a_live_holder_unless_forced(strategy, spawn, name):
    """``manage.py locks release NAME`` refuses a live worker's lock (exit 1, naming its pid and
    host); with ``--force`` it releases it, and the worker's later release leaves the next
    holder's lock alone."""
    holder = spawn("hold")
    pid, _token = holder.expect("held")
    isolation = CommandIsolation(name)

    refused = manage_locks(strategy, "release", name)
    assert refused.returncode == 1
    assert f"Not releasing {name}: its holder (pid {pid} on {HOSTNAME}) is alive." in (
        refused.stderr
    )
    with pytest.raises(AlreadyRunning) as caught:
        isolation.try_lock()
    assert caught.value.holder.pid == int(pid)

    forced = manage_locks(strategy, "release", name, "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.startswith(f"Force-released {name} (pid {pid} on {HOSTNAME})")
    with isolation.try_lock() as guard:
        holder.finish()  # its guard releases by token: not this lock
        assert isolation.holder().token == guard.info.token


@pytest.fixture
def unreachable(strategy: Distributed, settings, tmp_path: Path) -> Iterator[str]:
    """Point the strategy at a store that is down (port 1, or a SQLite file in a missing
    folder), with the password "secret". Yields what the error message must name: the URL's
    host part, or the settings alias."""
    if strategy.strategy == "redis":
        settings.ISOLATABLE = {**settings.ISOLATABLE, "REDIS_URL": UNREACHABLE_REDIS}
        yield "127.0.0.1:1/0"
        return
    if strategy.strategy == "cache":
        handler: Any = caches
        setting = "CACHE_ALIAS"
        alias = f"{strategy.settings[setting]}_down"
        config = {**caches.settings[strategy.settings[setting]], "LOCATION": UNREACHABLE_REDIS}
    else:
        handler = connections
        setting = "DATABASE_ALIAS"
        alias = f"{strategy.settings[setting]}_down"
        config = {**connections.settings[strategy.settings[setting]]}
        config.update(PORT="1", PASSWORD="secret")
        if config["ENGINE"].endswith("sqlite3"):
            config["NAME"] = str(tmp_path / "missing" / "locks.sqlite3")
    settings.ISOLATABLE = {**settings.ISOLATABLE, setting: alias}
    with extra_alias(handler, alias, config):
        yield repr(alias)


def test_an_unreachable_store_is_a_lock_io_error(strategy, unreachable):
    """A store that is down makes ``lock()`` raise ``LockIOError`` within the connect timeout;
    the message names the URL or the settings alias, never the password."""
    isolation = CommandIsolation("outage")
    started = time.monotonic()
    try:
        with pytest.raises(LockIOError) as raised:
            isolation.try_lock()
    finally:
        isolation.backend.close()
    assert time.monotonic() - started < 15
    message = str(raised.value)
    assert unreachable in message
    assert "secret" not in message
