from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import DatabaseError, connections

from tests import services
from tests.settings import KEY_PREFIX, SQLITE_PATH

LOCK_TABLE = "django_isolatable_lock"
SERVER_DATABASES = {"postgres": "postgres", "mariadb": "mariadb"}  # alias: service


@pytest.fixture(autouse=True)
def lock_dir(settings, tmp_path: Path) -> Path:
    """Every test gets its own LOCK_DIR (the file strategy's default location)."""
    directory = tmp_path / "locks"
    settings.ISOLATABLE = {**settings.ISOLATABLE, "LOCK_DIR": str(directory)}
    return directory


def _has_lock_table(alias: str) -> bool:
    with connections[alias].cursor():
        return LOCK_TABLE in connections[alias].introspection.table_names()


@pytest.fixture(scope="session", autouse=True)
def _leave_the_servers_as_found(django_db_blocker) -> Iterator[None]:
    """Tests share real servers: drop the lock tables this session created, delete its keys
    and its SQLite file. Everything a test creates is also namespaced by the session id."""
    with django_db_blocker.unblock():
        existed = {}
        for alias, service in SERVER_DATABASES.items():
            if services.reachable(service):
                with contextlib.suppress(DatabaseError):
                    existed[alias] = _has_lock_table(alias)
        yield
        for alias, had_table in existed.items():
            with contextlib.suppress(DatabaseError):
                if not had_table and _has_lock_table(alias):
                    with connections[alias].cursor() as cursor:
                        cursor.execute(f"DROP TABLE {LOCK_TABLE}")
            connections[alias].close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(SQLITE_PATH)
    if services.reachable("redis"):
        import redis

        client = redis.Redis.from_url(services.REDIS_URL)
        for key in client.scan_iter(f"{KEY_PREFIX}*", count=500):
            client.delete(key)
        client.close()
