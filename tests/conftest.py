from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def lock_dir(settings, tmp_path: Path) -> Path:
    """Every test gets its own LOCK_DIR (the file strategy's default location)."""
    directory = tmp_path / "locks"
    settings.ISOLATABLE = {"LOCK_DIR": str(directory)}
    return directory
