"""A small run of ``make stress``: the same runner, fewer workers and rounds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["stress", "--workers", "4", "--acquisitions", "30"], id="stress"),
        pytest.param(["crash", "--rounds", "5"], id="crash"),
        pytest.param(["semaphore", "--workers", "5", "--acquisitions", "30"], id="semaphore"),
        pytest.param(["shared", "--workers", "4", "--acquisitions", "30"], id="shared"),
        pytest.param(["starvation"], id="starvation"),
    ],
)
def test_no_overlap_no_lost_update_no_stuck_lock(args):
    """Every strategy whose server is up: 0 overlaps, 0 lost updates, prompt recovery from
    SIGKILL; a semaphore never has a holder too many; no exclusive hold beside a shared one;
    an exclusive locker gets in past a stream of shared holds. The runner exits 1 on any of
    them; its table is in the output."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.stress", *args],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
