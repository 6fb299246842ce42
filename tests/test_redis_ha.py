"""The redis strategy through a Sentinel group and on a Redis Cluster (the tests' own, on
127.0.0.1: tests/redis_topologies.py), and ``REDIS_REPLICA_ACKS``.

Every conformance test runs through Sentinel (with ``REDIS_REPLICA_ACKS=1``, so every take
and renewal waits for the replica) and on the cluster: locks, waiting handoff, semaphores,
shared holds, fencing tokens. Then the master is SIGKILLed under holders in rounds, with their
journals checked; and a cluster's keys, status and stale takeover are checked over many names,
and processes take turns on it.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from django_isolatable import CommandIsolation
from django_isolatable.backends import BackendOptions, Lease
from django_isolatable.backends.redis import RedisBackend
from django_isolatable.errors import LockIOError
from django_isolatable.holders import new_record
from tests.conformance import LockConformance
from tests.processes import (
    ROOT,
    Worker,
    Workers,
    assert_exclusive_counting,
    run_counting_workers,
)
from tests.redis_topologies import Cluster, SentinelGroup

#: The failover rounds' TTL: a lease confirmed at most TTL/3 before the kill must outlive the
#: failover (the master seen down after 1 s, a promotion 2 s after the kill, or 6 s and more
#: when the sentinels' first election splits its votes) and the old master's return as the
#: replica the acked renewals need.
FAILOVER_TTL = 12.0
ROUNDS = 3


def backend_on(settings: dict[str, Any], prefix: str, **options: Any) -> RedisBackend:
    """A redis backend with the topology's ``settings`` (as ``options_from_settings`` gives)."""
    entries = (entry.rsplit(":", 1) for entry in settings.get("REDIS_SENTINELS", ()))
    sentinels = tuple((host, int(port)) for host, port in entries)
    return RedisBackend(
        BackendOptions(
            lock_dir=Path("/nonexistent"),
            ttl=options.pop("ttl", 30.0),
            key_prefix=prefix,
            redis_url=settings.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            redis_sentinels=sentinels,
            redis_sentinel_service=settings.get("REDIS_SENTINEL_SERVICE"),
            redis_cluster=settings.get("REDIS_CLUSTER", False),
            **options,
        )
    )


def unique_prefix() -> str:
    return f"ha-{secrets.token_hex(4)}:"


class TestThroughSentinel(LockConformance):
    strategy = "redis"

    @pytest.fixture(autouse=True)
    def _strategy_settings(self, settings, django_db_blocker, sentinel_group: SentinelGroup):
        ha = {**sentinel_group.settings, "REDIS_REPLICA_ACKS": 1, "KEY_PREFIX": unique_prefix()}
        settings.ISOLATABLE = {**settings.ISOLATABLE, **ha}
        with django_db_blocker.unblock():
            yield


class TestOnCluster(LockConformance):
    strategy = "redis"

    @pytest.fixture(autouse=True)
    def _strategy_settings(self, settings, django_db_blocker, redis_cluster: Cluster):
        ha = {**redis_cluster.settings, "KEY_PREFIX": unique_prefix()}
        settings.ISOLATABLE = {**settings.ISOLATABLE, **ha}
        with django_db_blocker.unblock():
            yield


# -- Sentinel: failover ---------------------------------------------------------------------


def beliefs(journals: list[Path]) -> list[tuple[float, float, str, int, str]]:
    """Every time a process believed it held the lock, from the journals: ``(start, end, how
    it ended, pid, token)``; ``end`` is infinite (and ``how`` ``"held"``) while it lasts."""
    found = []
    for journal in journals:
        started: dict[str, tuple[float, int]] = {}
        for line in journal.read_text().splitlines():
            pid, event, at, token = line.split()
            if event == "acquired":
                started[token] = (float(at), int(pid))
            elif token in started:
                start, _ = started.pop(token)
                found.append((start, float(at), event, int(pid), token))
        found += [(start, float("inf"), "held", pid, t) for t, (start, pid) in started.items()]
    return sorted(found)


def assert_never_two_believers(found: list[tuple[float, float, str, int, str]]) -> None:
    for first, second in itertools.pairwise(found):
        assert first[1] < second[0], f"two processes believed they held the lock: {first} {second}"


#: The failover rounds' names: (name, REDIS_REPLICA_ACKS, contenders, its lease deleted on the
#: replica before the kill, so the new master lacks it). "plain" and "acked" have a waiting
#: contender each: a lease the new master kept must never let it in early.
FAILOVER_NAMES = [("plain", 0, 2, False), ("acked", 1, 2, False), ("unreplicated", 0, 1, True)]


@pytest.fixture
def failover_holders(sentinel_group: SentinelGroup, tmp_path: Path):
    """Start the holders of ``FAILOVER_NAMES``; yields ({name: journals}, a backend to look
    with); afterwards stops them and clears their keys."""
    prefix, workers, journals = unique_prefix(), [], {}
    for name, acks, contenders, _ in FAILOVER_NAMES:
        settings = {
            "STRATEGY": "redis",
            **sentinel_group.settings,
            "TTL": FAILOVER_TTL,
            "REDIS_REPLICA_ACKS": acks,
            "KEY_PREFIX": prefix,
        }
        env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(settings)}
        journals[name] = [tmp_path / f"{name}-{n}.journal" for n in range(contenders)]
        for journal in journals[name]:
            journal.touch()
            stderr = tmp_path / f"{journal.name}.stderr"
            module = "tests.failover_worker"
            workers.append(Worker(stderr, name, str(journal), env=env, module=module))
    for worker in workers:
        worker.expect("ready")
    yield journals, backend_on(sentinel_group.settings, prefix, ttl=FAILOVER_TTL)
    for worker in workers:
        worker.close()
    sentinel_group.heal()
    cleanup = backend_on(sentinel_group.settings, prefix)
    for name in journals:
        cleanup.force_release(name)


def drop_on_replica(sentinel_group: SentinelGroup, key: bytes) -> None:
    """Delete ``key`` on the replica only, as if its write had not been replicated yet."""
    replica = sentinel_group.replicas()[0]
    with replica.client() as client:
        client.config_set("replica-read-only", "no")
        assert client.delete(key) == 1
        client.config_set("replica-read-only", "yes")
    with sentinel_group.master().client() as client:
        assert client.exists(key)


def test_failover_rounds_never_let_two_believe_and_report_losses_in_time(
    sentinel_group: SentinelGroup, failover_holders
):
    journals, backend = failover_holders
    bound, outcomes = FAILOVER_TTL / 3 + 1, []

    def holders() -> dict[str, tuple[float, float, str, int, str]] | None:
        """Each name's one believer, once the store agrees that it holds the name."""
        held = {}
        for name, _, _, _ in FAILOVER_NAMES:
            current = [b for b in beliefs(journals[name]) if b[2] == "held"]
            if len(current) != 1 or [r.token for r in backend.inspect(name)] != [current[0][4]]:
                return None
            held[name] = current[0]
        return held

    for round_number in range(ROUNDS):
        deadline = time.monotonic() + 30
        while (before := holders()) is None:
            assert time.monotonic() < deadline, "the holders did not take their locks"
            time.sleep(0.05)
        drop_on_replica(sentinel_group, backend._keys("unreplicated").lock)
        old = sentinel_group.kill_master()
        killed = time.monotonic()
        sentinel_group.wait_for_failover(old.address)
        promoted = time.monotonic()
        sentinel_group.restart_as_replica(old)  # the acked holder's renewals need a replica
        time.sleep(max(0.0, promoted + bound + 0.2 - time.monotonic()))
        for name, acks, _, dropped in FAILOVER_NAMES:
            found = beliefs(journals[name])
            assert_never_two_believers(found)
            _, end, how, _, token = next(b for b in found if b[4] == before[name][4])
            outcomes.append((round_number, name, how, end - promoted, promoted - killed))
            if how == "lost":
                assert end <= promoted + bound, f"{name}: lost {end - promoted:.2f} s late"
                assert not acks, f"{name}: a lease the replica confirmed was lost"
            else:  # it still holds it, and the new master says so
                assert (how, dropped) == ("held", False), name
                assert [r.token for r in backend.inspect(name)] == [token]
    for round_number, name, how, after, failover in outcomes:  # shown with -s
        kept = "kept" if how == "held" else f"lost, reported {after:.2f} s after the promotion"
        print(f"round {round_number}: {name}: {kept} (promoted {failover:.2f} s after the kill)")


# -- REDIS_REPLICA_ACKS: fewer acks than asked -----------------------------------------------


@pytest.fixture
def unconfirmed(sentinel_group: SentinelGroup, monkeypatch):
    """A backend that asks for two acks from a group with one replica (a short WAIT), and a
    plain one on the same keys to look with."""
    monkeypatch.setattr(RedisBackend, "replica_wait_ms", 50)
    prefix = unique_prefix()
    asking = backend_on(sentinel_group.settings, prefix, redis_replica_acks=2)
    looking = backend_on(sentinel_group.settings, prefix)
    yield asking, looking
    for name in ("plain", "waited", "slot", "shared", "renewed"):
        looking.force_release(name)


def test_a_take_too_few_replicas_confirm_is_released_and_raises(unconfirmed):
    asking, looking = unconfirmed
    takes = {
        "plain": lambda info: asking.acquire("plain", info),
        "waited": lambda info: asking.acquire_waiting("waited", info, 1.0),
        "slot": lambda info: asking.acquire_slot("slot", info, 2),
        "shared": lambda info: asking.acquire_shared("shared", info),
    }
    # One replica confirms, or none if it is still catching up after an earlier test's failover:
    # fewer than the two asked for either way.
    for name, take in takes.items():
        with pytest.raises(LockIOError, match=r"Only [01] replica\(s\) of the master 'isolatable'"):
            take(new_record(name, "redis", ttl=30))
        assert looking.inspect(name) == [], f"{name} was kept"


def test_a_renewal_too_few_replicas_confirm_raises_and_a_lost_one_is_false(unconfirmed):
    asking, looking = unconfirmed
    info = new_record("renewed", "redis", ttl=30)
    lease = looking.acquire("renewed", info)
    assert lease is not None
    with pytest.raises(LockIOError, match="confirmed the renewal of lock renewed"):
        asking.refresh(lease, 30)
    with pytest.raises(LockIOError, match="confirmed the fencing token of renewed"):
        asking.fencing_token(lease)
    assert looking.release(lease)
    assert asking.refresh(lease, 30) is False  # not held: no ack is asked for


# -- Cluster: keys, status and stale takeover over many names -------------------------------

NAMES = [f"job-{n}" for n in range(195)] + ["a{b}c", "{", "}{", "x{}y", "{job-1}"]


def test_every_key_of_a_name_is_in_one_slot_whatever_its_braces(redis_cluster: Cluster):
    backend = backend_on(redis_cluster.settings, unique_prefix())
    client = redis_cluster.client()
    slots = set()
    for name in NAMES:
        keys = [
            *backend._keys(name),
            backend._base(name) + b"took:token",
            backend._base(name) + b"fence:" + name.encode(),
            backend._ran_key(name, 60, 1),
        ]
        assert len({client.keyslot(key) for key in keys}) == 1, name
        slots.add(client.keyslot(keys[0]))
    assert len(slots) > len(NAMES) * 0.9  # spread, not one slot for all
    plain = backend_on({}, "x:")
    assert plain._keys("a{b}")[0] == b"x:isolatable:lock:a{b}"  # one Redis: as before
    client.close()


HOLDER = """
import signal, sys, django
django.setup()
from django_isolatable import CommandIsolation
guards = [CommandIsolation(name).try_lock() for name in sys.argv[1:]]
assert all(guards)
print("held", flush=True)
signal.pause()
"""


def test_status_reads_every_master_and_dead_holders_are_taken_over(
    redis_cluster: Cluster, settings, capsys
):
    prefix = unique_prefix()
    ha = {"STRATEGY": "redis", **redis_cluster.settings, "KEY_PREFIX": prefix}
    settings.ISOLATABLE = ha
    env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(ha), "DJANGO_SETTINGS_MODULE": "tests.settings"}
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER), *NAMES],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        backend = backend_on(redis_cluster.settings, prefix)
        client = redis_cluster.client()
        masters = {client.get_node_from_key(backend._keys(name).lock).name for name in NAMES}
        assert masters == {node.name for node in client.get_primaries()}
        client.close()
        call_command("locks", "status", "--json")
        shown = json.loads(capsys.readouterr().out)
        assert sorted(lock["name"] for lock in shown) == sorted(NAMES)
        assert {lock["pid"] for lock in shown} == {holder.pid}
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    try:
        for name in NAMES:  # the holder is dead: each lock is taken over at once
            guard = CommandIsolation(name).try_lock()
            assert guard is not None, name
            guard.release()
        assert [info.name for info in backend.list()] == []
    finally:
        for name in NAMES:
            backend.force_release(name)


def test_a_waiter_on_a_cluster_is_handed_the_lock_of_a_name_with_braces(redis_cluster: Cluster):
    backend = backend_on(redis_cluster.settings, unique_prefix())
    name = "report{2026}"
    first = backend.acquire(name, new_record(name, "redis", ttl=30))
    assert first is not None
    assert backend.acquire_waiting(name, new_record(name, "redis", ttl=30), 0.05) is None
    assert backend.release(first)
    second = backend.acquire_waiting(name, new_record(name, "redis", ttl=30), 1.0)
    assert isinstance(second, Lease)
    assert [info.token for info in backend.inspect(name)] == [second.token]
    assert backend.release(second)


def test_on_a_cluster_a_take_waits_for_the_replicas_of_its_own_master(
    redis_cluster: Cluster, monkeypatch
):
    monkeypatch.setattr(RedisBackend, "replica_wait_ms", 50)
    backend = backend_on(redis_cluster.settings, unique_prefix(), redis_replica_acks=1)
    for name in ("job-1", "job-2", "job-3"):  # the test's cluster has no replicas
        with pytest.raises(LockIOError, match=r"Only 0 replica\(s\) of the Redis Cluster"):
            backend.acquire_waiting(name, new_record(name, "redis", ttl=30), 1.0)
        assert backend.inspect(name) == []


def test_processes_on_a_cluster_take_turns_without_overlap(redis_cluster: Cluster, tmp_path):
    """4 processes x 25 racy increments inside one lock (a name with braces): the handoffs go
    through the waiters' pipelines on the name's master; no update lost, no overlap."""
    ha = {"STRATEGY": "redis", **redis_cluster.settings, "KEY_PREFIX": unique_prefix()}
    workers = Workers(tmp_path, "count{er}", tmp_path)
    env = {"ISOLATABLE_TEST_SETTINGS": json.dumps(ha)}
    try:

        def spawn(command: str, *options: str) -> Worker:
            return workers.start(command, *options, env=env)

        journals = run_counting_workers(spawn, tmp_path, 4, "--iterations", "25", "--timeout", "60")
        assert_exclusive_counting(journals, tmp_path / "counter", 4 * 25)
    finally:
        workers.close()
