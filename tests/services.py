"""The servers some tests need: reachable, or a skip with the reason (a failure in CI)."""

from __future__ import annotations

import os
import socket

import pytest

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVERS = {
    "redis": ("127.0.0.1", 6379),
    "postgres": (os.environ.get("TEST_POSTGRES_HOST", "127.0.0.1"), 5432),
    "mariadb": (os.environ.get("TEST_MARIADB_HOST", "127.0.0.1"), 3306),
}


def reachable(service: str) -> bool:
    host, port = SERVERS[service]
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def require(service: str) -> None:
    """Skip the test when ``service`` is down, or fail it under ISOLATABLE_REQUIRE_SERVICES=1."""
    if reachable(service):
        return
    host, port = SERVERS[service]
    reason = f"{service} is not reachable at {host}:{port}"
    if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and ISOLATABLE_REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{reason} (set ISOLATABLE_REQUIRE_SERVICES=1 to fail instead)")
