"""The servers some tests need: reachable, or a skip with the reason (a failure in CI)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVERS = {
    "redis": (urlsplit(REDIS_URL).hostname or "127.0.0.1", urlsplit(REDIS_URL).port or 6379),
    "postgres": (
        os.environ.get("TEST_POSTGRES_HOST", "127.0.0.1"),
        int(os.environ.get("TEST_POSTGRES_PORT", "5432")),
    ),
    "mariadb": (
        os.environ.get("TEST_MARIADB_HOST", "127.0.0.1"),
        int(os.environ.get("TEST_MARIADB_PORT", "3306")),
    ),
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


LOCK_TABLE = "django_isolatable_lock"
PERIOD_TABLE = "django_isolatable_period"
FENCE_TABLE = "django_isolatable_fence"
#: The tables the app creates when missing (the lock table, once_per's periods, fences).
TABLES = (LOCK_TABLE, PERIOD_TABLE, FENCE_TABLE)
SERVER_DATABASES = {"postgres": "postgres", "mariadb": "mariadb"}  # alias: service


#: The test sessions of this machine that are using the servers' tables, and which tables there
#: were before the first of them began: sessions overlap (pytest-xdist's workers, `make test`'s
#: runs side by side), and a table one session created may be in use by another.
SESSIONS_FILE = Path(tempfile.gettempdir()) / "isolatable-tests-sessions.json"


@contextlib.contextmanager
def running_sessions() -> Iterator[dict[str, Any]]:
    """The sessions record (``sessions``: their pids, the ones that died dropped; ``tables``:
    alias -> the tables found by the first), locked against other sessions while the block
    reads and changes it; written back after."""
    with open(SESSIONS_FILE, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
        file.seek(0)
        record = json.loads(file.read() or '{"sessions": [], "tables": {}}')
        record["sessions"] = [pid for pid in record["sessions"] if psutil.pid_exists(pid)]
        yield record
        file.seek(0)
        file.truncate()
        json.dump(record, file)


@contextlib.contextmanager
def left_as_found() -> Iterator[None]:
    """Run the block, then delete this session's Redis keys and its SQLite file; the last of
    the overlapping sessions to end drops the lock tables they created on the shared servers.
    (Database access must be allowed.)"""
    from django.db import DatabaseError, connections

    from tests.settings import KEY_PREFIX, SQLITE_PATH

    def tables(alias: str) -> set[str]:
        with connections[alias].cursor():
            return set(TABLES) & set(connections[alias].introspection.table_names())

    def drop_tables_created_since(found: dict[str, list[str]]) -> None:
        for alias, had_tables in found.items():
            with contextlib.suppress(DatabaseError):
                for table in sorted(tables(alias) - set(had_tables)):
                    with connections[alias].cursor() as cursor:
                        cursor.execute(f"DROP TABLE {table}")

    with running_sessions() as record:
        if not record["sessions"]:  # the first: what is there now is what there was before
            record["tables"] = {}
            for alias, service in SERVER_DATABASES.items():
                if reachable(service):
                    with contextlib.suppress(DatabaseError):
                        record["tables"][alias] = sorted(tables(alias))
        record["sessions"].append(os.getpid())
    try:
        yield
    finally:
        with running_sessions() as record:
            record["sessions"].remove(os.getpid())
            if not record["sessions"]:  # the last: no other session is using the tables
                drop_tables_created_since(record["tables"])
        for alias in SERVER_DATABASES:
            connections[alias].close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SQLITE_PATH)
        if reachable("redis"):
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            for key in client.scan_iter(f"{KEY_PREFIX}*", count=500):
                client.delete(key)
            client.close()


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
