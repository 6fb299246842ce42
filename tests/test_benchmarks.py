"""A smoke run of the benchmarks (``make bench`` runs them in full): they run and stay exact;
and the proxy that counts their round trips counts what crosses the wire.

No timing is asserted here: speed is what the benchmark tables show, not a test outcome.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from benchmarks.wire import CountingProxy
from tests import services
from tests.settings import KEY_PREFIX

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_run_quick():
    result = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for section in (
        "Round trips per operation",
        "Uncontended acquire + release",
        "Decorator overhead",
        "Handoff latency",
        "Contention",
        "Command overhead",
        "Semaphores and shared locks, uncontended",
        "Semaphores and shared locks, handoff latency",
        "Event-loop lag",
        "Handoff to an alock() waiter",
        "locks status at scale",
        "Targets (issue 15)",
    ):
        assert section in result.stdout


@pytest.fixture
def redis_proxy():
    services.require("redis")
    proxy = CountingProxy(*services.SERVERS["redis"])
    yield proxy
    proxy.close()


def _reply(connection: socket.socket, ending: bytes) -> bytes:
    data = b""
    while not data.endswith(ending):
        chunk = connection.recv(4096)
        assert chunk, "the proxy closed the connection"
        data += chunk
    return data


def test_a_request_sent_in_pieces_is_one_round_trip(redis_proxy):
    with socket.create_connection(("127.0.0.1", redis_proxy.port)) as connection:
        connection.sendall(b"*1\r\n$4\r\n")
        time.sleep(0.05)  # the first piece is forwarded alone
        connection.sendall(b"PING\r\n")
        assert _reply(connection, b"\r\n") == b"+PONG\r\n"
        assert redis_proxy.trips == 1
        connection.sendall(b"PING\r\nPING\r\n")  # a pipeline
        assert _reply(connection, b"+PONG\r\n+PONG\r\n") == b"+PONG\r\n+PONG\r\n"
        assert redis_proxy.trips == 2


def test_an_answer_to_a_blocked_request_is_no_round_trip(redis_proxy):
    import redis

    key = f"{KEY_PREFIX}bench-wake"
    other = redis.Redis(*services.SERVERS["redis"])
    replies: list[bytes] = []
    with socket.create_connection(("127.0.0.1", redis_proxy.port)) as connection:
        blpop = f"*3\r\n$5\r\nBLPOP\r\n${len(key)}\r\n{key}\r\n$1\r\n5\r\n".encode()
        connection.sendall(blpop + b"PING\r\n")  # blocks; the PING waits behind it
        waiter = threading.Thread(target=lambda: replies.append(_reply(connection, b"+PONG\r\n")))
        waiter.start()
        deadline = time.monotonic() + 10
        while not any(client["cmd"] == "blpop" for client in other.client_list()):
            assert time.monotonic() < deadline, "the BLPOP never blocked"
            time.sleep(0.005)
        other.lpush(key, "x")
        waiter.join(10)
    other.close()
    assert replies[0].endswith(b"$1\r\nx\r\n+PONG\r\n")
    assert redis_proxy.trips == 1
