"""redis-server processes of the tests' own, on 127.0.0.1: the parts the topologies in
tests/redis_topologies.py are made of."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

if TYPE_CHECKING:
    import redis

HOST = "127.0.0.1"
Address = tuple[str, int]
T = TypeVar("T")


def executable(name: str) -> str:
    """The path of ``name`` (``redis-server``, ``redis-cli``), or a skip (a failure under
    ISOLATABLE_REQUIRE_SERVICES=1) saying it is missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not installed (it starts the tests' own Redis Sentinel and Cluster)"
    if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and ISOLATABLE_REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{reason}; set ISOLATABLE_REQUIRE_SERVICES=1 to fail instead")


def free_ports(count: int) -> list[int]:
    """``count`` different ports free on 127.0.0.1 now (all bound at once, so no two are the
    same). Another process may still take one before a server binds it: starting retries."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind((HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def wait_for(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """``condition()``'s first truthy value, polled until ``timeout`` seconds passed (its
    connection errors count as not yet); ``TimeoutError`` naming ``what`` then."""
    import redis.exceptions

    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            value = condition()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


def address(host: str | bytes, port: int | str | bytes) -> Address:
    """``(host, port)`` from a reply, which may give bytes."""
    return (host.decode() if isinstance(host, bytes) else host), int(port)


class PortTaken(Exception):
    """A server exited at start: another process took its port first."""


class Server:
    """One ``redis-server`` process on 127.0.0.1, which a test may kill and start again."""

    def __init__(self, port: int, directory: Path, arguments: list[str]) -> None:
        self.port = port
        self.address: Address = (HOST, port)
        self.directory = directory
        self.arguments = arguments
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def start(self, *extra: str) -> None:
        """Start it with its arguments plus ``extra``; return once it answers PING. Raises
        ``PortTaken`` when it exits first."""
        command = [executable("redis-server"), *self.arguments, "--port", str(self.port)]
        command += ["--bind", HOST, "--save", "", "--appendonly", "no", *extra]
        with open(self.directory / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.directory, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not self.answers():
            if self.process.poll() is not None:
                self.process = None
                log_tail = (self.directory / "server.log").read_text(errors="replace")[-500:]
                raise PortTaken(f"redis-server on port {self.port} exited at start: {log_tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} did not answer in 10 s")
            time.sleep(0.005)

    def answers(self) -> bool:
        try:
            with socket.create_connection(self.address, timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to replicas or sentinels."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def client(self, **options: Any) -> redis.Redis:
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=2, **options)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return client.info(section)


def start_all(
    make: Callable[[list[int]], list[Server]], ports: int, attempts: int = 3
) -> list[Server]:
    """The servers ``make`` builds on ``ports`` fresh free ports, each started; when one finds
    its port taken, all are killed and tried again on other ports."""
    for attempt in range(attempts):
        servers = make(free_ports(ports))
        try:
            for server in servers:
                server.start()
        except BaseException as e:
            for server in servers:  # none is left running, whatever went wrong
                server.kill()
            if not isinstance(e, PortTaken) or attempt == attempts - 1:
                raise
        else:
            return servers
    raise AssertionError("unreachable")
