"""The tests' own Redis topologies work with plain redis-py clients: a Sentinel group that
fails over when its master is SIGKILLed, and a 3-master Cluster that spreads keys over slots."""

from __future__ import annotations

import shutil

import pytest
from django.core import checks

from tests import redis_servers
from tests.redis_topologies import SERVICE, Cluster, SentinelGroup, running


def test_a_sentinel_group_serves_its_master_and_replicates(sentinel_group: SentinelGroup):
    sentinel = sentinel_group.sentinel()
    master = sentinel.master_for(SERVICE)
    master.set("topology:greeting", "hello")
    assert master.get("topology:greeting") == b"hello"
    assert master.wait(1, 5000) == 1  # the replica has it
    replica = sentinel.slave_for(SERVICE)
    assert replica.get("topology:greeting") == b"hello"
    master.delete("topology:greeting")


def test_a_killed_master_is_replaced_by_the_replica_and_comes_back_as_one(
    sentinel_group: SentinelGroup,
):
    sentinel = sentinel_group.sentinel()
    master = sentinel.master_for(SERVICE)
    master.set("topology:kept", "1")
    assert master.wait(1, 5000) == 1
    old = sentinel_group.kill_master()
    new = sentinel_group.wait_for_failover(old.address)
    assert new != old.address
    assert sentinel.discover_master(SERVICE) == new
    assert master.get("topology:kept") == b"1"  # the same client, now talking to the new master
    master.set("topology:after", "2")
    assert master.get("topology:after") == b"2"

    sentinel_group.heal()  # the old master, restarted as a replica of the new one
    assert old.alive
    replication = old.info("replication")
    assert (replication["role"], replication["master_port"]) == ("slave", new[1])
    with old.client() as client:
        assert client.get("topology:after") == b"2"
    master.delete("topology:kept", "topology:after")


def test_a_topology_is_torn_down_even_when_its_user_fails():
    with pytest.raises(RuntimeError), running(SentinelGroup) as group:  # noqa: PT012
        servers = [*group.servers, *group.sentinels]
        processes = [server.process for server in servers]
        assert all(server.alive for server in servers)
        raise RuntimeError("a failing test")
    assert all(process is not None and process.poll() is not None for process in processes)
    assert not group.directory.exists()


def test_a_cluster_spreads_keys_over_its_three_masters(redis_cluster: Cluster):
    client = redis_cluster.client()
    keys = [f"topology:key:{i}" for i in range(200)]
    for key in keys:
        client.set(key, key)
    primaries = client.get_primaries()
    assert len(primaries) == 3
    for primary in primaries:
        own = [key for key in keys if client.get_node_from_key(key).name == primary.name]
        assert own, f"no key landed on {primary.name}"
        with redis_cluster.node(primary.port).client() as node:
            assert node.mget(own[:1]) == [own[0].encode()]
            assert [node.get(key) for key in own] == [key.encode() for key in own]
    # A hash tag keeps a lock's keys in one slot, so one script can use them all.
    assert client.keyslot("{topology:lock}:a") == client.keyslot("{topology:lock}:b")
    client.delete(*keys)
    client.close()


def test_heal_restarts_a_killed_sentinel(sentinel_group: SentinelGroup):
    sentinel_group.sentinels[0].kill()
    sentinel_group.heal()
    assert all(sentinel.alive for sentinel in sentinel_group.sentinels)
    assert sentinel_group.sentinel().discover_master(SERVICE) == sentinel_group.master().address


def test_without_redis_server_the_topologies_skip_or_fail_when_required(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("ISOLATABLE_REQUIRE_SERVICES", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        redis_servers.executable("redis-server")
    monkeypatch.setenv("ISOLATABLE_REQUIRE_SERVICES", "1")
    with pytest.raises(pytest.fail.Exception, match="ISOLATABLE_REQUIRE_SERVICES=1 requires it"):
        redis_servers.executable("redis-server")


def test_the_topologies_settings_pass_the_checks(settings, sentinel_group, redis_cluster):
    for topology in (sentinel_group, redis_cluster):
        settings.ISOLATABLE = {"STRATEGY": "redis", **topology.settings}
        assert [m for m in checks.run_checks() if m.id and "isolatable" in m.id] == []
