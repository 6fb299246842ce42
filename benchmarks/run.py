"""Benchmarks: `python benchmarks/run.py` (or `make bench`) prints tables.

Uncontended acquire+release (µs/op, median and p90 of repeated batches) next to the raw limit
under each strategy, and handoff latency: how long after the holder calls release() a waiter
blocked in the library's own wait returns from lock(). Ratios to the raw limit of the same run
are what to compare: the machine is noisy, ratios much less so.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from django_isolatable import CommandIsolation  # noqa: E402


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def per_op(operation: Callable[[], None], batches: int, per_batch: int) -> list[float]:
    """Microseconds per operation for each batch."""
    operation()
    results = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(per_batch):
            operation()
        results.append((time.perf_counter() - started) / per_batch * 1e6)
    return results


def uncontended(lock_dir: Path, batches: int, per_batch: int) -> list[tuple[str, list[float]]]:
    path = lock_dir / "raw.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def raw_flock() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)

    def raw_open_flock_close() -> None:
        f = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(f)

    thread_lock = threading.Lock()

    def threading_lock() -> None:
        thread_lock.acquire()
        thread_lock.release()

    file_isolation = CommandIsolation("bench", lock_dir=lock_dir, strategy="file")
    memory_isolation = CommandIsolation("bench", strategy="memory")
    rows = [
        ("raw flock on an open fd", raw_flock),
        ("raw open+flock+close", raw_open_flock_close),
        ("file strategy", lambda: file_isolation.try_lock().release()),
        ("threading.Lock", threading_lock),
        ("memory strategy", lambda: memory_isolation.try_lock().release()),
    ]
    results = [(label, per_op(op, batches, per_batch)) for label, op in rows]
    os.close(fd)
    return results


def _waiter(strategy: str, lock_dir: str, conn: Connection, trials: int) -> None:
    isolation = CommandIsolation("handoff", lock_dir=lock_dir, strategy=strategy)
    for _ in range(trials):
        conn.recv()  # "start waiting"
        conn.send("waiting")
        guard = isolation.lock(timeout=30)
        acquired = time.monotonic()
        guard.release()
        conn.send(acquired)


def handoff(strategy: str, lock_dir: Path, trials: int) -> list[float]:
    """Milliseconds from release() in one process to lock() returning in another."""
    context = multiprocessing.get_context("fork")
    ours, theirs = context.Pipe()
    process = context.Process(target=_waiter, args=(strategy, str(lock_dir), theirs, trials))
    process.start()
    isolation = CommandIsolation("handoff", lock_dir=lock_dir, strategy=strategy)
    latencies = []
    for _ in range(trials):
        guard = isolation.lock(timeout=30)
        ours.send("go")
        ours.recv()
        time.sleep(random.uniform(0.02, 0.08))  # the waiter is blocked; poll phases do not align
        released = time.monotonic()
        guard.release()
        latencies.append((ours.recv() - released) * 1000)
    process.join(30)
    return latencies


def table(title: str, unit: str, rows: list[tuple[str, list[float]]], base: str) -> None:
    print(f"\n{title}")
    print(f"{'':32} {'median':>10} {'p90':>10} {'max':>10}  ratio to {base!r} (median)")
    medians = {label: statistics.median(values) for label, values in rows}
    for label, values in rows:
        ratio = medians[label] / medians[base] if medians[base] else float("nan")
        print(
            f"{label:32} {statistics.median(values):>8.2f}{unit} "
            f"{percentile(values, 0.9):>8.2f}{unit} {max(values):>8.2f}{unit}  {ratio:>6.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--per-batch", type=int, default=500)
    parser.add_argument("--trials", type=int, default=50, help="handoff trials (>= 30)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="isolatable-bench-") as directory:
        lock_dir = Path(directory)
        rows = uncontended(lock_dir, args.batches, args.per_batch)
        table("Uncontended acquire+release (µs/op)", "µs", rows[:3], "raw open+flock+close")
        table("", "µs", rows[3:], "threading.Lock")
        handoffs = [("file strategy", handoff("file", lock_dir, args.trials))]
        table(f"Handoff latency, {args.trials} trials (ms)", "ms", handoffs, "file strategy")


if __name__ == "__main__":
    main()
