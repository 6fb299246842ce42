"""Redis topologies of the tests' own, on 127.0.0.1: a Sentinel group and a 3-master Cluster.

Each is a set of ``redis-server`` processes without persistence, on free ports, in a temporary
directory, started once per test session by a fixture and always torn down (every process
killed, the directory removed), also when a test fails. tests/conftest.py registers the
fixtures: ``sentinel_group`` (a :class:`SentinelGroup`, healed before each test that asks for
it) and ``redis_cluster`` (a :class:`Cluster`). Without ``redis-server`` (or ``redis-cli`` for
the cluster) their tests are skipped, or fail under ``ISOLATABLE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.redis_servers import HOST, Server, executable, start_all, wait_for
from tests.sentinel_group import SERVICE, SentinelGroup

if TYPE_CHECKING:
    import redis.cluster

NODE_OPTIONS = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
NODE_OPTIONS += ["--cluster-node-timeout", "2000"]  # a node is seen failing after 2 s

__all__ = ["SERVICE", "Cluster", "SentinelGroup", "redis_cluster", "running", "sentinel_group"]


class Cluster:
    """Three masters owning all 16384 slots, no replicas; ``url`` names one node."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.nodes: list[Server] = []

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.nodes[0].port}/0"

    @property
    def settings(self) -> dict[str, Any]:
        """The ``ISOLATABLE`` keys that point the redis strategy at this cluster."""
        return {"REDIS_CLUSTER": True, "REDIS_URL": self.url}

    def node(self, port: int) -> Server:
        return next(node for node in self.nodes if node.port == port)

    def client(self, **options: Any) -> redis.cluster.RedisCluster:
        import redis.cluster

        return redis.cluster.RedisCluster(host=HOST, port=self.nodes[0].port, **options)

    def start(self) -> None:
        def nodes(ports: list[int]) -> list[Server]:
            clients, buses = ports[:3], ports[3:]
            return [
                Server(
                    port,
                    self.directory / f"node-{port}",
                    [*NODE_OPTIONS, "--cluster-port", str(bus)],
                )
                for port, bus in zip(clients, buses, strict=True)
            ]

        self.nodes = start_all(nodes, 6)  # three client ports, three cluster bus ports
        create = [executable("redis-cli"), "--cluster", "create"]
        create += [f"{HOST}:{node.port}" for node in self.nodes]
        create += ["--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(create)} failed: {done.stdout}{done.stderr}")

        def ok() -> bool:
            for node in self.nodes:
                with node.client() as client:
                    info = client.cluster("info")
                if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != 3:
                    return False
            return True

        wait_for(ok, 20, "cluster_state:ok on every node")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@contextlib.contextmanager
def running(topology: type[SentinelGroup] | type[Cluster]) -> Iterator[Any]:
    """``topology`` started in a fresh temporary directory; afterwards (whatever happened,
    also when starting failed half way) every process killed and the directory removed."""
    pytest.importorskip("redis", reason="the redis package is not installed")
    executable("redis-server")
    if topology is Cluster:
        executable("redis-cli")
    directory = Path(tempfile.mkdtemp(prefix=f"isolatable-{topology.__name__.lower()}-"))
    started = topology(directory)
    try:
        started.start()
        yield started
    finally:
        started.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def sentinel_group_processes() -> Iterator[SentinelGroup]:
    with running(SentinelGroup) as group:
        yield group


@pytest.fixture
def sentinel_group(sentinel_group_processes: SentinelGroup) -> SentinelGroup:
    """The session's Sentinel group, every server and sentinel running (a test before may
    have killed one)."""
    sentinel_group_processes.heal()
    return sentinel_group_processes


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """The session's 3-master Redis Cluster."""
    with running(Cluster) as cluster:
        yield cluster
