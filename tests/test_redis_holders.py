"""The redis strategy's semaphore slots and shared holds, beyond the conformance suite: killed
holders in real processes, leases that end, round trips, and what the server keeps, against a
redis-server of the test's own (``tests.services.PrivateRedis``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from django_isolatable import AlreadyRunning, CommandIsolation, IsolationError, LockTimeout
from django_isolatable.backends import Lease
from django_isolatable.backends.redis import RedisBackend
from django_isolatable.holders import LockInfo, new_record
from tests import test_redis_backend
from tests.processes import Workers
from tests.services import PrivateRedis
from tests.test_distributed import ANOTHER_HOST
from tests.test_redis_backend import TTL, blocked_in_blpop, make_backend, wait_until

# That module's fixtures: a client that looks at the server, and the backend's round trips.
observer = test_redis_backend.observer
round_trips = test_redis_backend.round_trips

#: A lease that ends while the test waits for it.
SHORT_TTL = 1.5


def slot(name: str, max_holders: int = 2, ttl: float = TTL) -> LockInfo:
    return new_record(name, "redis", ttl=ttl, mode="semaphore", max_holders=max_holders)


def shared(name: str, ttl: float = TTL) -> LockInfo:
    return new_record(name, "redis", ttl=ttl, mode="shared")


def taken(lease: Lease | None) -> Lease:
    assert lease is not None
    return lease


@pytest.fixture
def backend(private_redis: PrivateRedis) -> RedisBackend:
    return make_backend(private_redis.url)


@pytest.fixture
def strategy(settings, private_redis: PrivateRedis) -> dict[str, object]:
    """The redis strategy on the test's own server, in this process's settings."""
    isolatable = {"STRATEGY": "redis", "REDIS_URL": private_redis.url, "TTL": TTL}
    settings.ISOLATABLE = {**settings.ISOLATABLE, **isolatable}
    return isolatable


@pytest.fixture
def workers(tmp_path: Path, lock_dir: Path) -> Iterator[Workers]:
    started = Workers(tmp_path, "holders", lock_dir)
    yield started
    started.close()


def names_left(client: redis.Redis) -> list[bytes]:
    """The keys on the server but the wake-up lists and waiters' marks, which expire soon."""
    return sorted(k for k in client.keys("*") if b":wake:" not in k and b":waiting:" not in k)


# -- killed holders ---------------------------------------------------------------------------


@pytest.mark.parametrize("hold", ["slot", "shared"])
def test_a_sigkilled_holders_slot_or_shared_hold_is_taken_over_at_once(
    strategy, workers, observer, hold
):
    """Two holders in spawned processes on this host, SIGKILLed: the next lock call finds the
    dead pid and releases its hold, within a second or two of a 30 s lease."""
    env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(strategy)}
    options = ("--max-holders", "2") if hold == "slot" else ("--shared",)
    holders = [workers.start("hold", *options, env=env) for _ in range(2)]
    for holder in holders:
        holder.expect("held")
    isolation = CommandIsolation("holders", max_holders=2 if hold == "slot" else 1)
    assert sorted(h.pid for h in isolation.holders()) == sorted(h.pid for h in holders)
    with pytest.raises(AlreadyRunning):  # both slots, or shared holds: no exclusive lock
        isolation.try_lock()
    holders[0].kill()
    if hold == "shared":
        with pytest.raises(LockTimeout):  # the live shared holder still excludes it
            isolation.lock(timeout=0.5)
        holders[1].kill()
    started = time.monotonic()
    with isolation.lock(timeout=10) as guard:  # a slot, or the exclusive lock
        assert time.monotonic() - started < 2
        live = [holders[1].pid] if hold == "slot" else []
        assert sorted(h.pid for h in isolation.holders()) == sorted([*live, guard.info.pid])
    holders[1].kill()
    isolation.release_if_stale()  # what `locks release holders` does
    assert isolation.holders() == []
    assert names_left(observer) == []


@pytest.mark.parametrize("take", ["slot", "shared"])
def test_another_hosts_holder_is_freed_when_its_lease_ends(strategy, backend, observer, take):
    """A holder this host cannot judge (another host's record) is not taken over: the name
    stays held until its lease ends; then it is free and the server keeps nothing of it."""
    short = make_backend(backend.url, ttl=SHORT_TTL)
    if take == "slot":
        far = replace(slot("far"), host_id=ANOTHER_HOST, pid=424242)
        assert short.acquire_slot("far", far, 2) is not None
        assert short.acquire_slot("far", slot("far"), 2) is not None  # this process's: alive
        isolation = CommandIsolation("far", max_holders=2)
    else:
        far = replace(shared("far"), host_id=ANOTHER_HOST, pid=424242)
        assert short.acquire_shared("far", far) is not None
        isolation = CommandIsolation("far")
    with pytest.raises(AlreadyRunning):
        isolation.try_lock()
    [seen] = [h for h in isolation.holders() if h.token == far.token]
    assert (seen.host_id, seen.pid, seen.alive) == (ANOTHER_HOST, 424242, None)
    assert seen.expires_at is not None
    wait_until(lambda: isolation.holders() == [], "the leases' end", timeout=SHORT_TTL + 5)
    assert names_left(observer) == []
    with isolation.try_lock():
        pass


# -- round trips ------------------------------------------------------------------------------


def test_one_round_trip_to_take_renew_and_release_a_slot_or_a_shared_hold(
    backend, round_trips, observer
):
    for take in (
        lambda: backend.acquire_slot("trips", slot("trips"), 2),
        lambda: backend.acquire_shared("trips", shared("trips")),
    ):
        warm = take()  # connected, scripts loaded
        assert warm is not None
        backend.refresh(warm, TTL)
        backend.release(warm)
        round_trips.clear()
        lease = take()
        assert lease is not None
        assert len(round_trips) == 1
        assert backend.refresh(lease, TTL)
        assert len(round_trips) == 2
        assert backend.acquire("trips", new_record("trips", "redis", ttl=TTL)) is None
        assert len(round_trips) == 3  # a plain take that meets a group: one SET NX, failed
        assert backend.release(lease)
        assert len(round_trips) == 4
        assert names_left(observer) == []


def test_scripts_flushed_under_holders_are_loaded_again(backend, observer):
    """SCRIPT FLUSH (a failover to a replica without the scripts): each script is loaded
    again by the call that meets NOSCRIPT."""
    lease = backend.acquire_slot("flushed", slot("flushed"), 2)
    assert lease is not None
    observer.script_flush()
    assert backend.refresh(lease, TTL)
    observer.script_flush()
    assert backend.acquire_shared("flushed", shared("flushed")) is None
    observer.script_flush()
    assert backend.release(lease)
    assert names_left(observer) == []


# -- what the server keeps --------------------------------------------------------------------


def test_a_group_is_a_marker_in_the_lock_key_with_its_holders_beside_it(backend, observer):
    """The lock key holds ``= semaphore N`` (or ``= shared``); every key of the group expires
    with its longest lease, and the records read back are the ones given."""
    infos = [slot("kept", 3) for _ in range(2)]
    leases = [backend.acquire_slot("kept", info, 3) for info in infos]
    assert observer.get(b"isolatable:lock:kept") == b"= semaphore 3"
    assert observer.hgetall(b"isolatable:holders:kept") == {
        info.token.encode(): info.to_json().encode() for info in infos if info.token
    }
    for key in names_left(observer):
        assert 0 < observer.pttl(key) <= TTL * 1000
    seen = {h.token: h for h in backend.inspect("kept")}
    for info in infos:
        assert replace(seen[info.token], expires_at=info.expires_at) == replace(info, alive=None)
    assert sorted((h.name, h.token) for h in backend.list()) == sorted(
        ("kept", info.token) for info in infos
    )
    for lease in leases:
        assert lease is not None
        assert backend.release(lease)
    assert names_left(observer) == []
    assert backend.acquire_shared("kept", shared("kept")) is not None
    assert observer.get(b"isolatable:lock:kept") == b"= shared"
    assert backend.force_release("kept")
    assert names_left(observer) == []


def test_list_streams_plain_holders_and_each_holder_of_a_group(backend):
    leases = [
        taken(backend.acquire("plain", new_record("plain", "redis", ttl=TTL))),
        *(taken(backend.acquire_slot("slots", slot("slots", 3), 3)) for _ in range(3)),
        *(taken(backend.acquire_shared("reads", shared("reads"))) for _ in range(2)),
    ]
    assert sorted((h.name, h.mode, h.token) for h in backend.list()) == sorted(
        (lease.name, lease.info.mode, lease.token) for lease in leases
    )
    assert backend.force_release("slots", token=leases[2].token)  # that slot only
    assert sorted(h.token for h in backend.inspect("slots")) == sorted(
        [leases[1].token, leases[3].token]
    )
    assert not backend.refresh(leases[2], TTL)
    assert backend.force_release("slots")  # every slot
    assert backend.inspect("slots") == []
    for lease in leases:
        backend.release(lease)
    assert list(backend.list()) == []


def test_a_bare_lease_from_a_record_releases_that_holder_only(backend):
    """What the engine's stale takeover does with a dead holder's record."""
    leases = [taken(backend.acquire_slot("bare", slot("bare"), 2)) for _ in range(2)]
    record = backend.inspect("bare")[0]
    assert backend.release(Lease("bare", record.token or "", record))
    assert not backend.release(Lease("bare", record.token or "", record))
    assert [h.token for h in backend.inspect("bare")] == [
        lease.token for lease in leases if lease.token != record.token
    ]
    for lease in leases:
        backend.release(lease)
    assert backend.inspect("bare") == []


def test_a_slot_lease_that_ended_is_not_renewed_and_frees_its_slot(backend, observer):
    short = make_backend(backend.url, ttl=0.2)
    ended = short.acquire_slot("ended", slot("ended", ttl=0.2), 2)
    kept = backend.acquire_slot("ended", slot("ended"), 2)
    assert ended is not None
    assert kept is not None
    wait_until(lambda: len(backend.inspect("ended")) == 1, "the short lease's end")
    assert not backend.refresh(ended, TTL)
    assert not backend.release(ended)
    assert backend.acquire_slot("ended", slot("ended"), 2) is not None  # its slot
    assert backend.acquire_slot("ended", slot("ended"), 2) is None
    assert backend.force_release("ended")
    assert names_left(observer) == []


# -- counts and writer preference -------------------------------------------------------------


def test_a_current_holder_with_another_count_is_an_isolation_error(backend):
    plain = backend.acquire("counts", new_record("counts", "redis", ttl=TTL))
    with pytest.raises(IsolationError, match="held with max_holders=1, but this call asks for "
                       "max_holders=2"):  # fmt: skip
        backend.acquire_slot("counts", slot("counts", 2), 2)
    assert plain is not None
    assert backend.release(plain)
    three = backend.acquire_slot("counts", slot("counts", 3), 3)
    with pytest.raises(IsolationError, match="max_holders=3, but this call asks for max_holde"):
        backend.acquire_slot("counts", slot("counts", 2), 2)
    assert backend.acquire_shared("counts", shared("counts")) is None
    assert three is not None
    assert backend.release(three)
    reader = backend.acquire_shared("counts", shared("counts"))
    assert backend.acquire_slot("counts", slot("counts", 2), 2) is None  # held otherwise
    assert reader is not None
    assert backend.release(reader)


def test_a_waiting_exclusive_locker_holds_off_shared_holds_and_is_woken_by_the_last(
    backend, observer
):
    readers = [backend.acquire_shared("rw", shared("rw")) for _ in range(2)]
    got: list[Lease | None] = []
    writer = threading.Thread(target=lambda: got.append(
        backend.acquire_waiting("rw", new_record("rw", "redis", ttl=TTL), 10)))  # fmt: skip
    writer.start()
    wait_until(lambda: blocked_in_blpop(observer), "the writer blocking in BLPOP")
    assert backend.acquire_shared("rw", shared("rw")) is None  # it waits behind the writer
    started = time.monotonic()
    for reader in readers:
        assert reader is not None
        assert backend.release(reader)
    writer.join(10)
    assert time.monotonic() - started < 3  # woken by the release, not by its 5 s BLPOP's end
    assert got[0] is not None
    assert backend.acquire_shared("rw", shared("rw")) is None  # held exclusively
    assert backend.release(got[0])
    reader = backend.acquire_shared("rw", shared("rw"))  # the writer's mark went with it
    assert reader is not None
    assert backend.release(reader)


def test_resp3_connections_read_groups(private_redis):
    backend = make_backend(f"{private_redis.url}?protocol=3")
    lease = backend.acquire_slot("resp3", slot("resp3"), 2)
    assert lease is not None
    assert [h.token for h in backend.inspect("resp3")] == [lease.token]
    assert [h.token for h in backend.list()] == [lease.token]
    assert backend.release(lease)
