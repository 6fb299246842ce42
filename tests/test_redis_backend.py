"""The redis backend on its own: single attempts, the waiting ability, renewal, settings and
messages, against a redis-server of the test's own (``tests.services.PrivateRedis``) that
a test may stop, freeze with SIGSTOP, or restart.

The backend is driven directly, as ``CommandIsolation`` drives it; the records it is given are
made here, with ``holders.new_record``, as the engine makes them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.checks import Error
from django.core.exceptions import ImproperlyConfigured

from django_isolatable.backends import BackendOptions, Lease, Waiting
from django_isolatable.backends.redis import RedisBackend, safe_url
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, new_record
from tests.services import PrivateRedis
from tests.test_faults import ROOT

TTL = 30.0


def make_backend(url: str, ttl: float = TTL, key_prefix: str = "") -> RedisBackend:
    options = BackendOptions(lock_dir=Path("/nonexistent"), ttl=ttl, key_prefix=key_prefix,
                             redis_url=url)  # fmt: skip
    return RedisBackend(options)


def record(name: str, ttl: float = TTL) -> LockInfo:
    return new_record(name, "redis", ttl=ttl)


@pytest.fixture
def backend(private_redis: PrivateRedis) -> RedisBackend:
    return make_backend(private_redis.url)


class UncountedConnection(redis.connection.Connection):
    """The observer's: its commands are not the backend's round trips (see ``round_trips``)."""

    send_packed_command = redis.connection.AbstractConnection.send_packed_command


@pytest.fixture
def observer(private_redis: PrivateRedis) -> Iterator[redis.Redis]:
    """A client of the test's own, to look at the server behind the backend's back."""
    pool = redis.ConnectionPool.from_url(private_redis.url, connection_class=UncountedConnection)
    client = redis.Redis(connection_pool=pool)
    yield client
    client.close()


@pytest.fixture
def round_trips(monkeypatch) -> list[bytes]:
    """Every write the client makes (one per round trip: a pipeline is one write), by
    redis-py's public ``send_packed_command``, with the command names it carried."""
    sent: list[bytes] = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        data = command if isinstance(command, bytes) else b"".join(command)
        sent.append(data)
        send(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return sent


def blocked_in_blpop(observer: redis.Redis) -> bool:
    return any(c["cmd"] == "blpop" and "b" in c["flags"] for c in observer.client_list())


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s")
        time.sleep(0.005)
    return result


# -- one value format, the record as given ---------------------------------------------------


def test_it_has_the_waiting_ability(backend):
    assert isinstance(backend, Waiting)


def test_a_lock_taken_directly_or_by_a_wait_has_one_value_format(backend, observer):
    """``<token> <record as JSON>`` whichever way it was taken; readers get back the record the
    backend was given, with the expiry the server has now."""
    for take in (
        lambda name, info: backend.acquire(name, info),
        lambda name, info: backend.acquire_waiting(name, info, 5),
    ):
        info = record("format")
        lease = take("format", info)
        assert lease is not None
        assert (lease.name, lease.token, lease.info) == ("format", info.token, info)
        value = observer.get(b"isolatable:lock:format")
        assert value == f"{info.token} {info.to_json()}".encode()
        seen = (backend.inspect("format") or [None])[0]
        assert seen is not None
        assert seen.token == info.token
        assert (seen.pid, seen.argv, seen.acquired_at) == (info.pid, info.argv, info.acquired_at)
        assert seen.expires_at is not None
        assert backend.release(lease)
        assert backend.inspect("format") == []


def test_key_prefixes_keep_look_alike_names_apart(private_redis):
    """KEY_PREFIX "P:ns:" with name "job" and KEY_PREFIX "P:" with name "ns:job" are two locks,
    and each backend lists only its own."""
    first = make_backend(private_redis.url, key_prefix="P:ns:")
    second = make_backend(private_redis.url, key_prefix="P:")
    lease = first.acquire("job", record("job"))
    other = second.acquire("ns:job", record("ns:job"))
    assert lease is not None
    assert other is not None
    assert first.inspect("job")[0].token == lease.token
    assert second.inspect("ns:job")[0].token == other.token
    assert [info.name for info in first.list()] == ["job"]
    assert [info.name for info in second.list()] == ["ns:job"]
    assert first.release(lease)
    assert second.inspect("ns:job")[0].token == other.token
    assert second.release(other)


def test_list_streams_every_lock(backend):
    leases = [backend.acquire(f"many-{n}", record(f"many-{n}")) for n in range(1203)]
    listed = backend.list()
    assert isinstance(listed, Iterator)
    assert sorted(info.name for info in listed) == sorted(f"many-{n}" for n in range(1203))
    for lease in leases:
        assert lease is not None
        backend.release(lease)
    assert list(backend.list()) == []


def test_force_release_with_a_token_releases_only_that_holder(backend):
    lease = backend.acquire("forced", record("forced"))
    assert lease is not None
    assert not backend.force_release("forced", token="someone-else")
    assert backend.inspect("forced")[0].token == lease.token
    assert backend.force_release("forced", token=lease.token)
    assert backend.inspect("forced") == []
    assert not backend.force_release("forced", token=lease.token)
    assert backend.acquire("forced", record("forced")) is not None
    assert backend.force_release("forced")
    assert not backend.force_release("forced")


def test_resp3_connections_work(private_redis):
    """redis-py reads RESP3 (a ``?protocol=3`` URL) itself, push messages included."""
    backend = make_backend(f"{private_redis.url}?protocol=3")
    lease = backend.acquire("resp3", record("resp3"))
    assert lease is not None
    assert backend.refresh(lease, TTL)
    assert [info.token for info in backend.list()] == [lease.token]
    assert backend.release(lease)
    waited = backend.acquire_waiting("resp3", record("resp3"), 1)
    assert waited is not None
    assert backend.release(waited)


# -- round trips -----------------------------------------------------------------------------


def test_one_round_trip_to_take_renew_and_release(backend, round_trips, observer):
    backend.release(backend.acquire("warm", record("warm")))  # connected, scripts loaded
    backend.refresh(backend.acquire("warm", record("warm")), TTL)
    backend.force_release("warm")
    round_trips.clear()
    lease = backend.acquire("trips", record("trips"))
    assert lease is not None
    assert len(round_trips) == 1
    assert backend.refresh(lease, TTL)
    assert len(round_trips) == 2
    assert backend.release(lease)
    assert len(round_trips) == 3
    started = time.monotonic()
    assert backend.acquire_waiting("trips", record("trips"), 5) is not None  # free: one
    assert len(round_trips) == 4
    assert time.monotonic() - started < 1  # its BLPOP did not wait
    assert observer.keys("*took*") == []  # nor left a wake-up behind
    backend.force_release("trips")


def test_a_release_hands_the_lock_to_the_waiter_with_no_round_trip_between(
    backend, observer, round_trips
):
    """The waiter's SET NX is in the pipeline right behind its BLPOP: the release wakes it and
    the server takes the lock for it before the releasing process can take it back."""
    for attempt in range(3):  # the first makes the connections and loads the scripts
        observer.delete(b"isolatable:wake:handed")  # the last release's, which nobody took
        holder = backend.acquire("handed", record("handed"))
        assert holder is not None
        info = record("handed")
        got: list[Lease | None] = []
        waiter = threading.Thread(target=lambda got=got, info=info: got.append(
            backend.acquire_waiting("handed", info, 10)))  # fmt: skip
        sent = len(round_trips)
        waiter.start()
        wait_until(lambda: blocked_in_blpop(observer), "the waiter blocking in BLPOP")
        # One pipeline: the take of a free lock, BLPOP, and the take behind it.
        assert attempt == 0 or len(round_trips) == sent + 1
        sent = len(round_trips)
        assert backend.release(holder)
        assert backend.acquire("handed", record("handed")) is None
        waiter.join(10)
        # The release, the failed take, and nothing from the waiter after it was woken.
        assert attempt == 0 or len(round_trips) == sent + 2
        assert got[0] is not None
        assert backend.inspect("handed")[0].token == info.token
        assert backend.release(got[0])
    assert backend.inspect("handed") == []


def test_a_wait_that_times_out_returns_none_and_leaves_nothing(backend, observer):
    holder = backend.acquire("busy", record("busy"))
    assert holder is not None
    started = time.monotonic()
    assert backend.acquire_waiting("busy", record("busy"), 0.3) is None
    assert 0.25 < time.monotonic() - started < 5
    assert backend.inspect("busy")[0].token == holder.token
    assert backend.release(holder)
    assert observer.keys("*lock*") == []


def test_a_waiter_whose_take_meets_flushed_scripts(backend, observer):
    """SCRIPT FLUSH (a failover to a replica without the scripts) under a waiter: the waiter's
    take is a plain SET NX, and the holder's release loads its script again."""
    holder = backend.acquire("flushed-wait", record("flushed-wait"))
    assert holder is not None
    got: list[Lease | None] = []
    waiter = threading.Thread(
        target=lambda: got.append(backend.acquire_waiting("flushed-wait", record("x"), 10))
    )
    waiter.start()
    wait_until(lambda: blocked_in_blpop(observer), "the waiter blocking in BLPOP")
    observer.script_flush()
    assert backend.release(holder)
    waiter.join(10)
    assert got[0] is not None
    assert backend.inspect("flushed-wait")[0].token == got[0].token
    assert backend.release(got[0])


# -- interrupted waits -----------------------------------------------------------------------


class Interrupted(BaseException):
    pass


def test_a_wait_interrupted_while_blocked_leaves_nothing_held(backend, observer):
    """An interrupt in the middle of the pipeline (a signal handler's exception): the
    connection is dropped, so the take queued behind the BLPOP never runs, and the release of
    the holder wakes nobody stale."""
    holder = backend.acquire("interrupted", record("interrupted"))
    assert holder is not None

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            backend.acquire_waiting("interrupted", record("interrupted"), 10)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    wait_until(lambda: not blocked_in_blpop(observer), "the server dropping the BLPOP")
    assert backend.release(holder)
    assert backend.inspect("interrupted") == []
    assert backend.acquire("interrupted", record("interrupted")) is not None


WAITER = """
import os, signal, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
import django
django.setup()
from pathlib import Path
from django_isolatable.backends import BackendOptions
from django_isolatable.backends.redis import RedisBackend
from django_isolatable.holders import new_record

class Terminated(BaseException):
    pass

def terminated(signum, frame):
    raise Terminated

signal.signal(signal.SIGTERM, terminated)
backend = RedisBackend(BackendOptions(lock_dir=Path("/nonexistent"), ttl=30,
                                      redis_url=sys.argv[1]))
try:
    while backend.acquire_waiting("handoff", new_record("handoff", "redis", ttl=30),
                                  0.25) is None:
        pass
    print("held")
except Terminated:
    print("never held the lock")
    sys.exit(143)
"""


def interrupt_at_the_handoff(
    start_waiter: Callable[[], subprocess.Popen[str]],
    backend: RedisBackend,
    observer: redis.Redis,
    name: str,
) -> subprocess.Popen[str]:
    """A waiter stopped (SIGSTOP) while blocked in BLPOP; the holder releases, so the server
    wakes the waiter and takes the lock for it while it is stopped; then SIGTERM and SIGCONT.
    Returns the waiter once it exited. A release that came just after a wait slice ran out
    (the waiter was not woken by it) is tried again with a new waiter."""
    for _ in range(20):
        holder = backend.acquire(name, record(name))
        assert holder is not None
        waiter = start_waiter()
        try:
            wait_until(lambda: blocked_in_blpop(observer), "the waiter blocking in BLPOP", 30)
            waiter.send_signal(signal.SIGSTOP)
            if blocked_in_blpop(observer):
                backend.release(holder)
            taken = (backend.inspect(name) or [None])[0]
            waiter.send_signal(signal.SIGTERM)
            waiter.send_signal(signal.SIGCONT)
            waiter.wait(30)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
        if taken is not None and taken.pid == waiter.pid:
            return waiter
        backend.force_release(name)
    pytest.fail("the waiter was never woken while it was stopped")


def test_a_waiter_terminated_at_the_handoff_releases_what_was_taken(
    private_redis, backend, observer
):
    """Issue 13.7: the wake-up and the take were served while the waiter was stopped; its
    SIGTERM handler's exception ends the wait, and the lock it was given is released at once
    instead of blocking everyone for the TTL."""

    def start_waiter() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WAITER), private_redis.url],
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    waiter = interrupt_at_the_handoff(start_waiter, backend, observer, "handoff")
    assert waiter.returncode == 143
    assert waiter.stdout is not None
    assert waiter.stdout.read() == "never held the lock\n"
    assert observer.exists(b"isolatable:lock:handoff") == 0
    assert backend.acquire("handoff", record("handoff")) is not None


def test_a_command_terminated_at_the_handoff_releases_what_was_taken(
    private_redis, backend, observer, tmp_path
):
    """Issue 13.7 end to end: ``manage.py import_data --wait`` waiting in ``lock()``."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ISOLATABLE_", "DJANGO_"))},
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "ISOLATABLE_STRATEGY": "redis",
        "ISOLATABLE_TTL": "30",
        "ISOLATABLE_LOCK_DIR": str(tmp_path),
        "REDIS_URL": private_redis.url,
    }
    stderr = tmp_path / "waiter.stderr"

    def start_waiter() -> subprocess.Popen[str]:
        with stderr.open("w") as errors:
            return subprocess.Popen(
                [sys.executable, "manage.py", "import_data", "--seconds", "0", "--wait"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors, text=True,
            )  # fmt: skip

    waiter = interrupt_at_the_handoff(start_waiter, backend, observer, "import_data")
    assert waiter.returncode == 143, stderr.read_text()
    assert "never held the lock" in stderr.read_text()
    assert observer.exists(b"isolatable:lock:import_data") == 0
    assert backend.acquire("import_data", record("import_data")) is not None


# -- renewal against a server that stopped answering -----------------------------------------


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "connecting"])
def test_a_renewal_against_a_black_hole_gives_up_within_the_lease(private_redis, connected):
    """Issue 13.5: the server frozen (SIGSTOP: packets go unanswered, nothing is closed). A
    renewal raises LockIOError well within the time a lease renewed every TTL/3 has left,
    not after the 10 s socket timeout of other commands."""
    ttl = 2.0
    backend = make_backend(private_redis.url, ttl=ttl)
    lease = backend.acquire("frozen", record("frozen", ttl))
    assert lease is not None
    if connected:
        assert backend.refresh(lease, ttl)
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(LockIOError) as raised:
            backend.refresh(lease, ttl)
        assert time.monotonic() - started < ttl * 2 / 3
        assert str(raised.value).startswith(
            f"Redis at {private_redis.url} did not answer in time to renew (Timeout reading from "
        )
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    assert backend.refresh(lease, ttl)
    assert backend.release(lease)


# -- settings, credentials, the driver -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://app:s3cret@cache/0", "redis://app:***@cache/0"),
        ("redis://app:s3@c@ret@cache/0", "redis://app:***@cache/0"),
        ("redis://app@cache/0", "redis://app@cache/0"),
        ("rediss://cache/0?password=s3cret", "rediss://cache/0?password=***"),
        (
            "redis://cache/0?db=1&pass=a&pwd=b&token=c&secret=d&auth=e&auth_token=f&ssl_password=g",
            "redis://cache/0?db=1&pass=***&pwd=***&token=***&secret=***&auth=***&auth_token=***"
            "&ssl_password=***",
        ),
        ("unix://app:s3cret@/run/redis.sock?db=2", "unix://app:***@/run/redis.sock?db=2"),
        ("redis://:s3cret@[::1/0?Password=s3cret", "redis://:***@[::1/0?Password=***"),
    ],
)
def test_safe_url_masks_every_credential_and_keeps_the_username(url, shown):
    assert safe_url(url) == shown


def test_messages_and_the_store_name_never_show_a_password(private_redis):
    url = f"redis://app:s3cret@127.0.0.1:{private_redis.port}/0?password=s3cret"
    backend = make_backend(url)
    assert backend.store() == f"redis://app:***@127.0.0.1:{private_redis.port}/0?password=***"
    private_redis.stop()
    for attempt in (
        lambda: backend.acquire("down", record("down")),
        lambda: backend.acquire_waiting("down", record("down"), 1),
        lambda: backend.inspect("down"),
        lambda: list(backend.list()),
    ):
        with pytest.raises(LockIOError) as raised:
            attempt()
        assert str(raised.value).startswith(f"Redis at {backend.store()} is unreachable (")
        assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis://[::1:6379/0", "Invalid IPv6 URL"),
        ("redis://127.0.0.1:99999/0", "Port out of range 0-65535"),
        ("redis://:s3cret@127.0.0.1:99999/0?password=s3cret", "Port out of range 0-65535"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout' in "
                                                          "connection URL"),
    ],
)  # fmt: skip
def test_a_malformed_url_is_a_check_error_and_improperly_configured_at_use(url, reason):
    """Issue 13.12: ``manage.py check`` reports it (naming the key and the masked value) instead
    of crashing, and a lock raises ImproperlyConfigured with the same sentence."""
    options = BackendOptions(lock_dir=Path("/nonexistent"), ttl=TTL, redis_url=url)
    message = (
        f'settings.ISOLATABLE["REDIS_URL"] is {safe_url(url)!r}, which is not a valid Redis '
        f"URL ({reason}); fix it."
    )
    assert RedisBackend.check_settings(options) == [Error(message, id="isolatable.E022")]
    with pytest.raises(ImproperlyConfigured) as raised:
        RedisBackend(options)
    assert str(raised.value) == message
    assert "s3cret" not in message


def test_a_url_that_is_not_redis_is_e021_with_the_password_masked():
    url = "http://app:s3cret@cache:6379/0?password=s3cret"
    options = BackendOptions(lock_dir=Path("/nonexistent"), ttl=TTL, redis_url=url)
    message = (
        "settings.ISOLATABLE[\"REDIS_URL\"] is 'http://app:***@cache:6379/0?password=***'; use "
        "a redis://, rediss:// or unix:// URL."
    )
    assert RedisBackend.check_settings(options) == [Error(message, id="isolatable.E021")]
    with pytest.raises(ImproperlyConfigured, match=r"^settings\.ISOLATABLE"):
        RedisBackend(options)


def test_a_missing_driver_at_use_is_improperly_configured(monkeypatch):
    for module in [name for name in sys.modules if name == "redis" or name.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, module, None)
    options = BackendOptions(lock_dir=Path("/nonexistent"), ttl=TTL)
    with pytest.raises(ImproperlyConfigured) as raised:
        RedisBackend(options)
    assert str(raised.value) == (
        "The redis strategy needs the redis package: pip install 'django-isolatable[redis]'."
    )
