from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services
from tests.services import PrivateRedis

# The isolatable_locks fixture, registered the way a project without the entry point would;
# sentinel_group and redis_cluster, the tests' own Redis topologies.
pytest_plugins = ["django_isolatable.testing", "tests.redis_topologies"]

# `locks status` cuts its table to COLUMNS: tests that read its rows must see whole lines.
os.environ.pop("COLUMNS", None)


@pytest.fixture(autouse=True)
def lock_dir(settings, tmp_path: Path) -> Path:
    """Every test gets its own LOCK_DIR (the file strategy's default location)."""
    directory = tmp_path / "locks"
    settings.ISOLATABLE = {**settings.ISOLATABLE, "LOCK_DIR": str(directory)}
    return directory


@pytest.fixture(scope="session", autouse=True)
def _leave_the_servers_as_found(django_db_blocker) -> Iterator[None]:
    """Tests share real servers: drop the lock tables this session created, delete its keys
    and its SQLite file. Everything a test creates is also namespaced by the session id."""
    with django_db_blocker.unblock(), services.left_as_found():
        yield


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of this test's own (``redis-server`` must be installed), which the test
    may stop, freeze (SIGSTOP: a network black hole) or restart."""
    if shutil.which("redis-server") is None:
        if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
            pytest.fail("redis-server is not installed, and ISOLATABLE_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
