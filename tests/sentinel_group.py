"""A Redis Sentinel group of the tests' own on 127.0.0.1 (the ``sentinel_group`` fixture)."""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.redis_servers import HOST, Address, Server, address, start_all, wait_for

if TYPE_CHECKING:
    import redis.sentinel

SERVICE = "isolatable"  # the master's name
#: Seconds to wait for a failover or a restarted server: a few are enough, but a sentinel
#: starved of CPU for 2 s (a loaded CI machine) enters TILT mode and does nothing for 30 s.
PATIENCE = 45


class SentinelGroup:
    """A master, one replica and three sentinels (quorum 2), each its own process. A master
    is seen down after 1 s and a failover completes in a few seconds."""

    service = SERVICE

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Server] = []  # the master and the replica, in either role
        self.sentinels: list[Server] = []

    @property
    def sentinel_addresses(self) -> list[Address]:
        return [sentinel.address for sentinel in self.sentinels]

    @property
    def settings(self) -> dict[str, Any]:
        """The ``ISOLATABLE`` keys that point the redis strategy at this group."""
        hosts = [f"{host}:{port}" for host, port in self.sentinel_addresses]
        return {"REDIS_SENTINELS": hosts, "REDIS_SENTINEL_SERVICE": SERVICE}

    def sentinel(self, **options: Any) -> redis.sentinel.Sentinel:
        """A redis-py ``Sentinel`` over the three sentinels (options go to its master and
        replica connections)."""
        import redis.sentinel

        kwargs = {"socket_timeout": 1, **options}
        return redis.sentinel.Sentinel(
            self.sentinel_addresses, sentinel_kwargs={"socket_timeout": 1}, **kwargs
        )

    def start(self) -> None:
        def data_servers(ports: list[int]) -> list[Server]:
            # No delay before a full sync: a replica is in sync at once, also after a restart.
            fast = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
            return [Server(port, self.directory / f"server-{port}", fast) for port in ports]

        self.servers = start_all(data_servers, 2)
        master, replica = self.servers
        with replica.client() as client:
            client.replicaof(HOST, master.port)
        wait_for(lambda: self._in_sync(replica), 10, "the replica's first sync")
        self.sentinels = start_all(lambda ports: self._sentinels(ports, master, replica), 3)
        self.wait_until_settled(10)

    def _sentinels(self, ports: list[int], master: Server, replica: Server) -> list[Server]:
        """Sentinels that know each other and the replica from the start: without that, they
        find each other by the hello messages they publish every 2 s."""
        ids = {port: secrets.token_hex(20) for port in ports}
        sentinels = []
        for port in ports:
            directory = self.directory / f"sentinel-{port}"
            directory.mkdir(parents=True, exist_ok=True)
            lines = [
                f"sentinel myid {ids[port]}",
                f"sentinel monitor {SERVICE} {HOST} {master.port} 2",
                f"sentinel down-after-milliseconds {SERVICE} 1000",
                f"sentinel failover-timeout {SERVICE} 3000",
                f"sentinel parallel-syncs {SERVICE} 1",
                f"sentinel known-replica {SERVICE} {HOST} {replica.port}",
            ]
            lines += [
                f"sentinel known-sentinel {SERVICE} {HOST} {other} {ids[other]}"
                for other in ports
                if other != port
            ]
            config = directory / "sentinel.conf"  # a sentinel rewrites its file: one each
            config.write_text("\n".join(lines) + "\n")
            sentinels.append(Server(port, directory, [str(config), "--sentinel"]))
        return sentinels

    def _in_sync(self, replica: Server) -> bool:
        info = replica.info("replication")
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def master_address(self) -> Address:
        """The master's address as the sentinels see it (``Sentinel.discover_master``)."""
        return address(*self.sentinel().discover_master(SERVICE))

    def _named_master(self) -> Address:
        """The master the first answering sentinel names, even one it sees down."""
        import redis.exceptions

        for sentinel in self.sentinels:
            with contextlib.suppress(redis.exceptions.RedisError), sentinel.client() as client:
                return address(*client.sentinel_get_master_addr_by_name(SERVICE))
        raise RuntimeError("no sentinel of the Sentinel group answers")

    def master(self) -> Server:
        port = self.master_address()[1]
        return next(server for server in self.servers if server.port == port)

    def replicas(self) -> list[Server]:
        port = self.master_address()[1]
        return [server for server in self.servers if server.port != port]

    def kill_master(self) -> Server:
        """SIGKILL the current master; returns it (dead). The sentinels then promote the
        replica: ``wait_for_failover``."""
        master = self.master()
        master.kill()
        return master

    def wait_for_failover(self, old: Address, timeout: float = PATIENCE) -> Address:
        """The new master's address, once every sentinel names one other than ``old`` and it
        answers as a master."""

        def promoted() -> Address | None:
            seen = set()
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    seen.add(address(*client.sentinel_get_master_addr_by_name(SERVICE)))
            if len(seen) != 1 or old in seen:
                return None
            new = seen.pop()
            server = next(server for server in self.servers if server.address == new)
            return new if server.info("replication").get("role") == "master" else None

        return wait_for(promoted, timeout, f"a failover away from {old[0]}:{old[1]}")

    def restart_as_replica(self, server: Server, timeout: float = PATIENCE) -> None:
        """Start ``server`` (killed) again as a replica of the current master; return once it
        is in sync and every sentinel counts it as a healthy replica."""
        host, port = self.master_address()
        server.start("--replicaof", host, str(port))
        self.wait_until_settled(timeout)

    def failover(self, timeout: float = PATIENCE) -> Address:
        """Kill the master, wait for the promotion, restart the old master as a replica: the
        new master's address."""
        old = self.kill_master()
        new = self.wait_for_failover(old.address, timeout)
        self.restart_as_replica(old, timeout)
        return new

    def heal(self) -> None:
        """Restart every killed sentinel, and every killed server as a replica; return once
        the group is settled (at once when nothing was killed)."""
        if all(server.alive for server in [*self.sentinels, *self.servers]):
            return
        for sentinel in self.sentinels:
            if not sentinel.alive:
                sentinel.start()  # from the configuration it keeps up to date
        if not any(server.alive for server in self.servers):
            raise RuntimeError("both Redis servers of the Sentinel group are down")
        named = self._named_master()
        if not next(server for server in self.servers if server.address == named).alive:
            self.wait_for_failover(named)
        for server in self.servers:
            if not server.alive:
                host, port = self.master_address()
                server.start("--replicaof", host, str(port))
        self.wait_until_settled(PATIENCE)

    def wait_until_settled(self, timeout: float) -> None:
        """Until every sentinel names one master, knows the two other sentinels and sees every
        other server as a replica in sync: a failover can start at once."""

        def settled() -> bool:
            master = self.master_address()
            replicas = {s.address for s in self.servers if s.address != master}
            if not all(self._in_sync(s) for s in self.servers if s.address != master):
                return False
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    state = client.sentinel_master(SERVICE)
                    healthy = {
                        address(r["ip"], r["port"])
                        for r in client.sentinel_slaves(SERVICE)
                        if not (r["is_sdown"] or r["is_disconnected"])
                        and r.get("master-link-status") == "ok"
                    }
                if address(state["ip"], state["port"]) != master:
                    return False
                if state["num-other-sentinels"] != 2 or not replicas <= healthy:
                    return False
            return True

        wait_for(settled, timeout, "the Sentinel group settling")

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.kill()
