"""A smoke run of the benchmarks (``make bench`` runs them in full): they run and stay exact.

No timing is asserted here: speed is what the benchmark tables show, not a test outcome.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
        "Handoff latency",
        "Contention",
        "Command overhead",
        "Targets (issue 15)",
    ):
        assert section in result.stdout
