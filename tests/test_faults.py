"""Injected faults: a store restarted under a held lease, a full disk, a frozen directory, clock
jumps, forks, and signals while waiting. Each names the fault and what must happen."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from django_isolatable import (
    AlreadyRunning,
    CommandIsolation,
    LockGuard,
    LockIOError,
    LockPermissionError,
)
from django_isolatable.backends import BackendOptions
from django_isolatable.backends.file import FileBackend
from django_isolatable.signals import lock_lost
from tests import services
from tests.settings import KEY_PREFIX

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lost_events() -> Iterator[list[str]]:
    names: list[str] = []

    def receiver(sender, name, guard, **kwargs):
        names.append(name)

    lock_lost.connect(receiver)
    yield names
    lock_lost.disconnect(receiver)


def test_redis_restarted_under_a_held_lease(settings, private_redis, lost_events):
    """Redis without persistence forgets every lease when it restarts: the holder's guard
    reports the loss within about one renewal interval, and a new holder can proceed."""
    ttl = 1.5
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": ttl}
    guard = CommandIsolation("nightly").lock(timeout=0)
    private_redis.stop()
    private_redis.start()
    deadline = time.monotonic() + ttl * 3
    while not guard.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guard.lost
    assert lost_events == ["nightly"]
    with CommandIsolation("nightly").lock(timeout=0) as new:
        assert CommandIsolation("nightly").holder().token == new.info.token
        guard.release()  # the lost guard's release is a quiet no-op: the new lease survives
        assert CommandIsolation("nightly").holder().token == new.info.token


def test_a_redis_holder_behind_a_black_hole_learns_of_the_loss_in_time(
    settings, private_redis, lost_events
):
    """Issue 13.5: Redis stops answering and closes nothing (SIGSTOP: a network black hole).
    The lease may expire TTL seconds after the freeze, when another host could take the lock;
    the holder's guard is lost by then plus TTL/3 and a second, not after a socket timeout."""
    ttl = 2.0
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": ttl}
    guard = CommandIsolation("black-hole").lock(timeout=0)
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        while not guard.lost and time.monotonic() < frozen + 20:
            time.sleep(0.02)
        lost_after = time.monotonic() - frozen
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    assert guard.lost
    assert lost_after < ttl + ttl / 3 + 1
    assert lost_events == ["black-hole"]
    guard.release()


def test_redis_scripts_flushed_under_a_held_lease(settings, private_redis):
    """SCRIPT FLUSH (or a failover to a replica without the scripts): release and renewal load
    their Lua scripts again and work."""
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": 30}
    isolation = CommandIsolation("flushed")
    guard = isolation.lock(timeout=0)
    isolation.backend.client.script_flush()
    assert isolation.backend.refresh(guard._lease, 30)
    isolation.backend.client.script_flush()
    guard.release()
    assert isolation.holder() is None
    isolation.try_lock().release()


def test_a_redis_connection_the_server_closed_meanwhile_reconnects(settings, private_redis):
    """The server drops a holder's idle connection (its client timeout, CLIENT KILL, a
    restart): the release reconnects and frees the lock instead of failing."""
    import redis

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    isolation = CommandIsolation("dropped")
    guard = isolation.lock(timeout=0)
    killer = redis.Redis.from_url(private_redis.url)
    assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
    killer.close()
    guard.release()
    assert isolation.holder() is None


def test_threads_taking_redis_locks_one_after_another_share_pooled_connections(
    settings, private_redis
):
    """Threads that take and release locks leave no connection each behind: the client's pool
    hands the same connections out again."""
    import redis

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    observer = redis.Redis.from_url(private_redis.url)
    CommandIsolation("threads").try_lock().release()
    before = len(observer.client_list())
    for _ in range(5):
        worker = threading.Thread(target=lambda: CommandIsolation("threads").try_lock().release())
        worker.start()
        worker.join(10)
    assert len(observer.client_list()) <= before + 1  # a renewal's, at most
    observer.close()


def test_a_forked_child_never_talks_on_the_parents_redis_connection(settings, private_redis):
    """redis-py's pool checks the process id: a forked child opens connections of its own
    (another CLIENT ID), and its exit leaves the parent's connection and lock as they were."""
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    with CommandIsolation("parent").lock(timeout=0) as guard:
        client = CommandIsolation("parent").backend.client
        parents = client.client_id()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                CommandIsolation("child").lock(timeout=0).release()
                guard.release()  # the parent's lease, inherited: a quiet no-op
                status = 0 if client.client_id() != parents else 2
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client.client_id() == parents
        assert CommandIsolation("parent").holder().token == guard.info.token
    assert CommandIsolation("parent").holder() is None


def _blocked_in_blpop(client) -> bool:
    return any(c["cmd"] == "blpop" and "b" in c["flags"] for c in client.client_list())


def test_a_redis_release_hands_the_lock_to_the_waiter(settings, private_redis):
    """A waiter blocked in BLPOP has its take queued right behind it on the server: the
    release hands it the lock before the releasing process can take it back, and its record
    (token, when it took the lock) is what readers see."""
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": 30}
    isolation = CommandIsolation("handed")
    client = isolation.backend.client
    for _ in range(3):
        holder = isolation.lock(timeout=0)
        got: list[LockGuard] = []
        waiter = threading.Thread(
            target=lambda got=got: got.append(CommandIsolation("handed").lock(10))
        )
        waiter.start()
        deadline = time.monotonic() + 10
        while not _blocked_in_blpop(client) and time.monotonic() < deadline:
            time.sleep(0.01)
        holder.release()
        with pytest.raises(AlreadyRunning):
            isolation.try_lock()
        waiter.join(10)
        guard = got[0]
        record = isolation.holder()
        assert record is not None
        assert record.token == guard.info.token
        assert record.acquired_at == guard.info.acquired_at
        assert abs((record.acquired_at - datetime.now(timezone.utc)).total_seconds()) < 5
        guard.release()
    assert isolation.holder() is None


def test_a_redis_waiter_whose_take_meets_flushed_scripts(settings, private_redis):
    """SCRIPT FLUSH (a failover to a replica without the scripts) while a waiter blocks: the
    holder's release loads its script again, and the waiter takes the lock."""
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": 30}
    isolation = CommandIsolation("flushed-wait")
    client = isolation.backend.client
    holder = isolation.lock(timeout=0)
    got: list[LockGuard] = []
    waiter = threading.Thread(target=lambda: got.append(CommandIsolation("flushed-wait").lock(10)))
    waiter.start()
    deadline = time.monotonic() + 10
    while not _blocked_in_blpop(client) and time.monotonic() < deadline:
        time.sleep(0.01)
    client.script_flush()
    holder.release()
    waiter.join(10)
    assert isolation.holder().token == got[0].info.token
    got[0].release()
    assert isolation.holder() is None


def test_a_redis_value_that_is_no_record_reads_as_an_unknown_holder(settings, private_redis):
    """A key written by something else: its first word is read as the token, the rest as no
    record, and it can still be released by force."""
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    isolation = CommandIsolation("odd")
    key = isolation.backend._keys("odd").lock
    isolation.backend.client.set(key, b"tok not json")
    holder = isolation.holder()
    assert holder is not None
    assert (holder.token, holder.pid, holder.acquired_at) == ("tok", None, None)
    assert isolation.release_all()
    assert isolation.holder() is None


def test_redis_back_after_an_outage_locks_again(settings, private_redis):
    """Connections that failed are dropped, not reused: once the server is back, locks work."""
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    isolation = CommandIsolation("outage")
    isolation.try_lock().release()
    private_redis.stop()
    with pytest.raises(LockIOError, match="is unreachable"):
        isolation.try_lock()
    private_redis.start()
    isolation.try_lock().release()
    assert isolation.holder() is None


def test_redis_down_at_acquire_is_a_prompt_lock_io_error(settings, private_redis):
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    private_redis.stop()
    started = time.monotonic()
    with pytest.raises(LockIOError, match=f"Redis at redis://127.0.0.1:{private_redis.port}/0"):
        CommandIsolation("nightly").try_lock()
    assert time.monotonic() - started < 15


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        # Free lock files stay open between acquisitions; close them, as unmounting needs.
        FileBackend(BackendOptions(lock_dir=path, ttl=60)).close()  # and those below
        gc.collect()  # a dropped backend's LOCK_DIR descriptor, which it keeps while it lives
        subprocess.run(["umount", str(path)], check=True)


def test_full_disk_still_locks_without_a_record(tmp_path, caplog):
    """No space for the holder's record: the lock is still taken and excludes others; the
    record is left empty (never torn) and a warning says why."""
    with tmpfs(tmp_path / "full", "size=16k") as mount:
        directory = mount / "locks"
        directory.mkdir()
        (directory / "existing.lock").touch()
        with contextlib.suppress(OSError):
            (mount / "filler").write_bytes(b"x" * 64 * 1024)
        isolation = CommandIsolation("existing", lock_dir=directory)
        with isolation.lock(timeout=0):
            assert (directory / "existing.lock").read_bytes() == b""
            assert "could not write its holder record" in caplog.text
            thread_result: list[BaseException] = []
            thread = threading.Thread(
                target=lambda result, waiter: result.append(_try(waiter)),
                args=(thread_result, isolation.with_timeout(0)),
            )
            thread.start()
            thread.join(10)
            assert isinstance(thread_result[0], AlreadyRunning)
        isolation.try_lock().release()
        # Its backend keeps LOCK_DIR open while it lives, and so does the error's traceback.
        del isolation, thread, thread_result


def _try(isolation: CommandIsolation) -> BaseException:
    try:
        isolation.lock().release()
    except BaseException as e:
        return e
    return AssertionError("took a lock that was held")


def test_no_inodes_left_is_a_clear_lock_io_error(tmp_path):
    with tmpfs(tmp_path / "noinodes", "size=1m,nr_inodes=3") as mount:
        directory = mount / "locks"
        directory.mkdir()
        for n in range(10):
            with contextlib.suppress(OSError):
                (mount / f"f{n}").touch()
        with pytest.raises(LockIOError, match="No space left on device"):
            CommandIsolation("new", lock_dir=directory).try_lock()


def test_lock_dir_frozen_while_held(tmp_path):
    """A directory that stops accepting new files (immutable, read-only remount) while a lock is
    held: its holder releases normally, an existing lock file still works, and a new name gets
    a LockPermissionError that names the directory and the setting."""
    directory = tmp_path / "locks"
    guard = CommandIsolation("held", lock_dir=directory).lock(timeout=0)
    frozen = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
    if frozen.returncode != 0:
        guard.release()
        pytest.skip(f"cannot make a directory immutable here: {frozen.stderr.decode().strip()}")
    try:
        guard.release()
        CommandIsolation("held", lock_dir=directory).try_lock().release()
        with pytest.raises(LockPermissionError) as raised:
            CommandIsolation("new", lock_dir=directory).try_lock()
        assert raised.value.path == directory
        assert 'settings.ISOLATABLE["LOCK_DIR"]' in str(raised.value)
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


EXPIRING = [
    pytest.param({"STRATEGY": "redis", "REDIS_URL": services.REDIS_URL}, "redis", id="redis"),
    pytest.param({"STRATEGY": "database", "DATABASE_ALIAS": "sqlite"}, None, id="database-sqlite"),
    pytest.param(
        {"STRATEGY": "database", "DATABASE_ALIAS": "postgres"}, "postgres", id="database-pg"
    ),
    pytest.param({"STRATEGY": "cache", "CACHE_ALIAS": "redis"}, "redis", id="cache"),
]


@pytest.mark.parametrize("jump", [timedelta(days=1), -timedelta(days=1)], ids=["ahead", "behind"])
@pytest.mark.parametrize(("strategy_settings", "service"), EXPIRING)
def test_a_holder_with_a_wrong_clock_keeps_its_lease_for_the_ttl(
    settings, django_db_blocker, monkeypatch, strategy_settings, service, jump
):
    """Expiry is judged by the store's clock: a holder whose wall clock is a day off (ahead or
    behind) still holds for the TTL, and its lease still runs out after it."""
    if service:
        services.require(service)
    ttl = 2.0
    settings.ISOLATABLE = {**strategy_settings, "TTL": ttl, "KEY_PREFIX": KEY_PREFIX}

    class WrongClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + jump

    from django_isolatable import holders

    name = f"clock-{jump.days}-{time.monotonic_ns()}"
    with django_db_blocker.unblock():
        monkeypatch.setattr(holders, "datetime", WrongClock)
        isolation = CommandIsolation(name, strategy=strategy_settings["STRATEGY"])
        lease = isolation.backend.acquire(name, holders.new_record(name, "x", ttl=ttl))
        monkeypatch.undo()
        assert lease is not None
        taken = time.monotonic()
        with pytest.raises(AlreadyRunning):
            CommandIsolation(name).try_lock()  # not expired, whatever the holder's clock said
        assert time.monotonic() - taken < ttl, "the check itself took longer than the TTL"
        with CommandIsolation(name).lock(timeout=ttl * 5):
            assert time.monotonic() - taken >= ttl * 0.9


WAIT_THEN_SIGNAL = """
import os, signal, sys, django
django.setup()
from django_isolatable import CommandIsolation
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_ends_cleanly_with_nothing_held(tmp_path, signum):
    """SIGTERM/SIGINT to a command waiting with --wait: it exits 128+signal at once, says it
    never held the lock, and nothing of it is left: the holder is undisturbed, and once the
    holder is done the lock is free."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "ISOLATABLE_LOCK_DIR": str(tmp_path),
    }
    manage = [sys.executable, "manage.py", "import_data"]
    holder = subprocess.Popen([*manage, "--seconds", "60"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    waiter = None
    try:
        assert holder.stdout is not None
        assert "importing" in holder.stdout.readline()
        waiter = subprocess.Popen([*manage, "--seconds", "0", "--wait"], cwd=ROOT, env=env,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert waiter.stderr is not None
        assert waiter.stderr.readline().startswith("Waiting for import_data")
        waiter.send_signal(signum)
        assert waiter.wait(10) == 128 + signum
        assert "never held the lock" in waiter.stderr.read()
        isolation = CommandIsolation("import_data", lock_dir=tmp_path)
        assert isolation.holder().pid == holder.pid
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(10)
        if waiter is not None and waiter.poll() is None:
            waiter.kill()
    assert CommandIsolation("import_data", lock_dir=tmp_path).holder() is None


FORKING = [
    pytest.param({"STRATEGY": "redis", "REDIS_URL": services.REDIS_URL}, "redis", id="redis"),
    pytest.param({"STRATEGY": "postgres", "DATABASE_ALIAS": "postgres"}, "postgres", id="postgres"),
    pytest.param({"STRATEGY": "database", "DATABASE_ALIAS": "postgres"}, "postgres", id="database"),
]


@pytest.mark.parametrize(("strategy_settings", "service"), FORKING)
def test_a_forked_child_never_releases_its_parents_lock(
    settings, django_db_blocker, strategy_settings, service
):
    """A child forked while the parent holds the lock: neither the child's release() nor the
    finalizers of what it inherited (the guard, connections) touch the parent's lock or its
    connection."""
    services.require(service)
    settings.ISOLATABLE = {**strategy_settings, "KEY_PREFIX": KEY_PREFIX}
    name = f"fork-{time.monotonic_ns()}"
    with django_db_blocker.unblock():
        guard = CommandIsolation(name).lock(timeout=0)
        for collect in (False, True):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                status = 0
                try:
                    guard.release()
                    if collect:  # finalizers of the guard and of inherited connections run
                        guard = None
                        gc.collect()
                except BaseException:
                    status = 1
                os._exit(status)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            holder = CommandIsolation(name).holder()
            assert holder is not None, "the child released the parent's lock"
            assert holder.pid == os.getpid()
        guard.check()
        guard.release()
        assert CommandIsolation(name).holder() is None


@pytest.fixture
def shared_session(settings, django_db_blocker, monkeypatch):
    """A postgres lock held by this test, and every connection the strategy asks for handed that
    very server session, as a pooler sharing sessions between clients would; yields the lock's
    name, its guard and an undo() of the sharing."""
    services.require("postgres")
    settings.ISOLATABLE = {"STRATEGY": "postgres", "DATABASE_ALIAS": "postgres"}
    from django_isolatable.backends.pgsession import Sessions

    name = f"pooled-{time.monotonic_ns()}"
    with django_db_blocker.unblock():
        first = CommandIsolation(name).lock(timeout=0)
        shared = first._lease.connection  # type: ignore[attr-defined]
        monkeypatch.setattr(Sessions, "connect", lambda self: shared)
        monkeypatch.setattr(Sessions, "put_back", lambda self, connection: None)
        yield name, first, monkeypatch.undo
        monkeypatch.undo()
        first.release()


def test_a_pooler_sharing_sessions_is_caught_not_trusted(shared_session):
    """Through PgBouncer in transaction mode, two clients' statements can run in one server
    session, where advisory locks are reentrant: the second "gets" the first's lock. Simulated
    here by handing both clients the same session: the second must get a clear LockIOError,
    and the first keeps its lock."""
    name, first, undo = shared_session
    with pytest.raises(LockIOError, match="pooler that shares server sessions"):
        CommandIsolation(name).try_lock()
    undo()
    assert CommandIsolation(name).is_locked()
    first.check()
    first.release()
    assert CommandIsolation(name).holder() is None


def test_a_pooler_sharing_sessions_is_caught_in_a_queued_wait_too(shared_session):
    """The same, for a waiter handed the holder's session: it refuses before it queues (there,
    its pg_advisory_lock would be granted at once, reentrantly)."""
    from django_isolatable.holders import new_record

    name, first, undo = shared_session
    backend = CommandIsolation(name).backend
    with pytest.raises(LockIOError, match="pooler that shares server sessions"):
        backend.acquire_waiting(name, new_record(name, "postgres"), 1.0)  # type: ignore[attr-defined]
    undo()
    assert CommandIsolation(name).is_locked()
    first.check()
    first.release()
    assert CommandIsolation(name).holder() is None


def test_database_strategy_without_use_tz(settings, django_db_blocker):
    """USE_TZ = False: the record's datetimes are stored the way Django stores them then."""
    settings.USE_TZ = False
    settings.ISOLATABLE = {"STRATEGY": "database", "DATABASE_ALIAS": "sqlite", "TTL": 5}
    name = f"naive-{time.monotonic_ns()}"
    with django_db_blocker.unblock(), CommandIsolation(name).lock(timeout=0) as guard:
        holder = CommandIsolation(name).holder()
        assert holder.token == guard.info.token
        assert abs(holder.acquired_at - guard.info.acquired_at) < timedelta(seconds=1)
