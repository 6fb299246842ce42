from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services

# The isolatable_locks fixture, registered the way a project without the entry point would.
pytest_plugins = ["django_isolatable.testing"]

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
