"""Injected faults: a store restarted under a held lease, a full disk, a frozen directory, clock
jumps, forks, and signals while waiting. Each names the fault and what must happen."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import signal
import socket
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, without persistence, that the test may restart."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
            pytest.fail("redis-server is not installed, and ISOLATABLE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


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


def test_redis_error_replies_are_read_in_full_so_the_connection_stays_in_step(
    settings, private_redis
):
    """Commands go out in one write: an error reply among them is returned after every reply
    was read, so the pooled connection's next command gets its own reply."""
    from redis.exceptions import NoScriptError, ResponseError

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    backend = CommandIsolation("in-step").backend
    replies = backend._send(
        "test", ("EVALSHA", "0" * 40, 0), ("INCRBY", "in-step", "x"), ("ECHO", "after")
    )
    assert isinstance(replies[0], NoScriptError)
    assert isinstance(replies[1], ResponseError)
    assert replies[2] == b"after"
    from django_isolatable.backends import redis as redis_backend

    connection = redis_backend._this_thread.connections[private_redis.url]
    for number in range(3):
        assert backend._send("test", ("ECHO", str(number))) == [str(number).encode()]
    assert redis_backend._this_thread.connections[private_redis.url] is connection


def test_a_redis_connection_that_fails_mid_exchange_is_not_reused(settings, private_redis):
    """A reply that never comes (the server gone): the connection is disconnected before it
    goes back to the pool, and the error is a LockIOError naming the server."""
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    isolation = CommandIsolation("mid-exchange")
    backend = isolation.backend
    assert backend._send("test", ("PING",)) == [b"PONG"]  # a pooled connection exists
    from django_isolatable.backends import redis as redis_backend

    connection = redis_backend._this_thread.connections[private_redis.url]
    private_redis.stop()
    with pytest.raises(LockIOError, match="is unreachable"):
        backend._send("test", ("PING",))
    assert connection._sock is None
    private_redis.start()
    isolation.try_lock().release()  # the same connection, connected again


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


def test_a_readable_redis_connection_that_is_not_stale_is_kept(
    settings, private_redis, monkeypatch
):
    """Readable is not closed: a TLS connection gets a session ticket after its handshake,
    which the client's own check reads and finds no reply in. Only that check drops it."""
    import select

    from django_isolatable.backends import redis as strategy

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    isolation = CommandIsolation("readable")
    isolation.lock(timeout=0).release()
    connection = strategy._this_thread.connections[private_redis.url]
    sock = connection._sock
    checked: list[bool] = []
    can_read = connection.can_read

    def readable(*args):
        return [sock], [], []

    def counted_can_read(*args, **kwargs):
        checked.append(can_read(*args, **kwargs))
        return checked[-1]

    monkeypatch.setattr(select, "select", readable)
    monkeypatch.setattr(connection, "can_read", counted_can_read)
    isolation.lock(timeout=0).release()
    assert checked, "the client's own check never ran"
    assert not any(checked)
    assert connection._sock is sock, "a connection with nothing to read was dropped"


def test_a_threads_redis_connection_closes_with_the_thread(settings, private_redis):
    """A thread that took a lock leaves no connection behind when it ends."""
    import redis

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    observer = redis.Redis.from_url(private_redis.url)
    before = len(observer.client_list())
    for _ in range(5):
        worker = threading.Thread(target=lambda: CommandIsolation("threads").try_lock().release())
        worker.start()
        worker.join(10)
    gc.collect()
    assert len(observer.client_list()) <= before + 1  # the renewal thread's, at most
    observer.close()


def test_a_forked_child_never_talks_on_the_parents_redis_connection(settings, private_redis):
    """Each thread keeps its own connection for the lock's commands: a forked child opens its
    own, and its exit leaves the parent's connection working."""
    from django_isolatable.backends import redis as redis_backend

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    with CommandIsolation("parent").lock(timeout=0):
        parents = redis_backend._this_thread.connections[private_redis.url]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                if private_redis.url not in redis_backend._this_thread.connections:
                    CommandIsolation("child").lock(timeout=0).release()
                    mine = redis_backend._this_thread.connections[private_redis.url]
                    status = 0 if mine is not parents else 2
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert CommandIsolation("parent").holder() is not None
    assert redis_backend._this_thread.connections[private_redis.url] is parents
    assert CommandIsolation("parent").holder() is None


def _blocked_in_blpop(client) -> bool:
    return any(c["cmd"] == "blpop" and "b" in c["flags"] for c in client.client_list())


def test_a_redis_release_hands_the_lock_to_the_waiter(settings, private_redis):
    """A waiter blocked in BLPOP has its take queued right behind it on the server: the
    release hands it the lock before the releasing process can take it back, and its record
    (token, the server's time it took the lock) is what readers see."""
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
    """The take queued behind a waiter's BLPOP finds no script (SCRIPT FLUSH, a failover):
    the waiter loads it and takes the lock by a plain attempt."""
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


def test_a_redis_take_its_thread_never_claimed_is_released_not_handed_out(
    settings, private_redis, monkeypatch
):
    """A wait that took the lock, then an interruption before the thread's next attempt: later,
    that stale take (never renewed) is released by its token, and the attempt takes the lock
    afresh under its own."""
    from django_isolatable.backends import redis as redis_backend
    from django_isolatable.holders import new_record

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": 30}
    isolation = CommandIsolation("interrupted")
    backend = isolation.backend
    backend.wait("interrupted", 0.01)  # free: the take behind the BLPOP took it
    taken = isolation.holder()
    assert taken is not None
    monkeypatch.setattr(redis_backend, "TAKEN_FRESH_FOR", 0.0)
    record = new_record("interrupted", "redis", ttl=30)
    lease = backend.acquire("interrupted", record)
    assert lease is not None
    assert lease.token == record.token != taken.token
    assert isolation.holder().token == record.token
    backend.release(lease)
    assert isolation.holder() is None


def test_a_redis_wait_on_a_free_lock_takes_it_at_once_and_leaves_no_key(settings, private_redis):
    """The wait's first TAKE finds the lock free: its own list wakes the BLPOP behind it at
    once (a 30 s wait that blocked would fail on the 10 s socket timeout), the TAKE after that
    finds the lock held and does nothing, and the thread's next acquire returns the lock."""
    from django_isolatable.holders import new_record

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": 30}
    isolation = CommandIsolation("free-wait")
    backend = isolation.backend
    backend.wait("free-wait", 30)
    taken = isolation.holder()
    assert taken is not None
    assert taken.pid == os.getpid()
    lease = backend.acquire("free-wait", new_record("free-wait", "redis", ttl=30))
    assert lease is not None
    assert lease.token == taken.token
    assert lease.info.acquired_at == taken.acquired_at
    assert lease.info.expires_at == taken.acquired_at + timedelta(seconds=30)
    assert list(backend.client.scan_iter(b"*taken:*")) == []
    assert backend.release(lease)
    assert isolation.holder() is None


def test_a_redis_lock_that_may_wait_asks_the_server_once_when_the_lock_is_free(
    settings, private_redis, monkeypatch
):
    """Under contention (its isolation found the lock held and looked at the holder lately), a
    lock() that may wait starts with the wait, which takes a free lock in the same exchange.
    Otherwise it starts with a plain attempt: uncontended, that is the one exchange, and a
    dead holder's lock is found, and taken over, at once."""
    from django_isolatable import isolation as isolation_module
    from django_isolatable.backends.redis import RedisBackend

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": 30}
    monkeypatch.setattr(isolation_module, "STALE_CHECK_EVERY", 60.0)
    sent: list[str] = []
    send = RedisBackend._send
    monkeypatch.setattr(
        RedisBackend,
        "_send",
        lambda self, what, *commands: sent.append(what) or send(self, what, *commands),
    )
    isolation = CommandIsolation("asked-once")
    isolation.lock(timeout=5).release()
    assert sent == ["lock", "release"]
    with CommandIsolation("asked-once").lock(timeout=0), pytest.raises(AlreadyRunning):
        isolation.lock(timeout=0)  # held: the holder was looked at (alive)
    sent.clear()
    isolation.lock(timeout=5).release()
    assert sent == ["wait", "release"]
    assert isolation.holder() is None


def test_a_redis_wait_whose_first_take_meets_flushed_scripts_still_claims_a_later_take(
    settings, private_redis
):
    """SCRIPT FLUSH before a wait: its first TAKE fails with NOSCRIPT and it blocks. Another
    process loads TAKE meanwhile, so the TAKE behind the BLPOP runs when the holder releases:
    that lock is this thread's, and its next acquire returns it (not an error)."""
    from django_isolatable.backends import redis as redis_backend
    from django_isolatable.holders import new_record

    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": 30}
    isolation = CommandIsolation("reloaded")
    backend = isolation.backend
    client = backend.client
    holder = isolation.lock(timeout=0)
    redis_backend._take_loaded.add(private_redis.url)
    client.script_flush()
    got: list[object] = []

    def wait_then_acquire() -> None:
        try:
            backend.wait("reloaded", 5)
            got.append(backend.acquire("reloaded", new_record("reloaded", "redis", ttl=30)))
        except Exception as e:
            got.append(e)

    waiter = threading.Thread(target=wait_then_acquire)
    waiter.start()
    deadline = time.monotonic() + 10
    while not _blocked_in_blpop(client) and time.monotonic() < deadline:
        time.sleep(0.01)
    client.script_load(redis_backend.TAKE)
    holder.release()
    waiter.join(10)
    (lease,) = got
    assert not isinstance(lease, Exception), lease
    assert lease is not None
    assert isolation.holder().token == lease.token
    assert backend.release(lease)
    assert isolation.holder() is None


def test_a_redis_value_with_a_foreign_time_field_reads_as_unknown_time(settings, private_redis):
    settings.ISOLATABLE = {"STRATEGY": "redis", "REDIS_URL": private_redis.url}
    isolation = CommandIsolation("odd")
    key, _ = isolation.backend._keys("odd")
    isolation.backend.client.set(key, b"tok 99999999999999999999999999 {}")
    holder = isolation.holder()
    assert holder is not None
    assert holder.token == "tok"
    assert holder.acquired_at is None
    assert isolation.release_all()


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
                target=lambda: thread_result.append(_try(isolation.with_timeout(0)))
            )
            thread.start()
            thread.join(10)
            assert isinstance(thread_result[0], AlreadyRunning)
        isolation.try_lock().release()


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
