"""Real processes for the tests: ``tests/workers.py`` workers, and what their journals prove.

A ``Worker`` is one ``python -m tests.workers ...`` process whose stdout lines are read as
events, so a test awaits an event instead of sleeping. ``Workers`` starts them on one lock name
(with extra environment, such as ``ISOLATABLE_TEST_SETTINGS`` to give them a strategy) and kills
those still running at the end of the test. ``run_counting_workers`` runs ``count`` workers
against one counter; ``assert_exclusive_counting`` checks from their journals that no update was
lost and that no two critical sections overlapped.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVENT_TIMEOUT = 30.0  # seconds to wait for a worker's event: only a hang should ever hit it


class Worker:
    """A ``python -m tests.workers`` process (or ``module``'s) whose stdout lines are read as
    events."""

    def __init__(
        self,
        stderr_path: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        module: str = "tests.workers",
    ) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", **(env or {})},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
            )
        self.pid = self.process.pid
        self._events: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._events.put(line.strip())
        self._events.put(None)  # EOF: the worker exited

    def expect(self, event: str, timeout: float = EVENT_TIMEOUT) -> list[str]:
        """Wait for the next event line, check its first word, return the rest of its words."""
        try:
            line = self._events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"worker {self.pid} sent no {event!r} within {timeout} s{self._stderr()}")
        if line is None:
            pytest.fail(f"worker {self.pid} exited before {event!r}{self._stderr()}")
        word, *rest = line.split()
        assert word == event, f"worker {self.pid} sent {line!r}, expected {event!r}"
        return rest

    def event(self, timeout: float = EVENT_TIMEOUT) -> list[str]:
        """Wait for the next event line, whatever it is; return its words."""
        try:
            line = self._events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"worker {self.pid} sent no event within {timeout} s{self._stderr()}")
        if line is None:
            pytest.fail(f"worker {self.pid} exited before its next event{self._stderr()}")
        return line.split()

    def send(self, line: str = "") -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        """Tell the worker to let go, and check that it exits cleanly."""
        self.send("release")
        assert self.process.wait(EVENT_TIMEOUT) == 0, self._stderr()

    def kill(self) -> None:
        """SIGKILL the worker and reap it (its descriptors and connections are gone after)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(EVENT_TIMEOUT)

    def close(self) -> None:
        """Kill the worker if it still runs, and close its pipes."""
        if self.process.poll() is None:
            self.kill()
        self._reader.join(EVENT_TIMEOUT)  # EOF follows the exit: the reader is done with stdout
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def _stderr(self) -> str:
        return f"; its stderr:\n{self.stderr_path.read_text()}"


class Workers:
    """Starts workers on one lock name, their stderr in ``directory``; ``close()`` kills the
    ones still running. A test fixture yields ``start`` and calls ``close`` afterwards."""

    def __init__(self, directory: Path, name: str, lock_dir: Path) -> None:
        self.directory = directory
        self.name = name
        self.lock_dir = lock_dir
        self.started: list[Worker] = []

    def start(self, command: str, *options: str, env: Mapping[str, str] | None = None) -> Worker:
        """Start ``python -m tests.workers COMMAND NAME LOCK_DIR *options`` with ``env`` added."""
        stderr_path = self.directory / f"worker-{len(self.started)}-{command}.stderr"
        worker = Worker(stderr_path, command, self.name, str(self.lock_dir), *options, env=env)
        self.started.append(worker)
        return worker

    def close(self) -> None:
        for worker in self.started:
            worker.close()


def run_counting_workers(
    spawn: Callable[..., Worker], tmp_path: Path, workers: int, *options: str
) -> list[Path]:
    """Start ``workers`` ``count`` workers on one counter, release them at once, await them.

    The counter is ``tmp_path / "counter"``. Returns their journal files.
    """
    counter = tmp_path / "counter"
    counter.write_text("0")
    journals = [tmp_path / f"journal-{n}" for n in range(workers)]
    started = [
        spawn("count", "--counter", str(counter), "--journal", str(journal), *options)
        for journal in journals
    ]
    for worker in started:
        worker.expect("ready")
    for worker in started:  # all set up (Django imported): now they contend from the start
        worker.send("go")
    for worker in started:
        worker.expect("done", timeout=60)
        assert worker.process.wait(EVENT_TIMEOUT) == 0
    return journals


def read_intervals(journals: list[Path]) -> list[tuple[float, float, int]]:
    """Every critical section from the journals as ``(start, end, pid)``, sorted by start."""
    intervals = []
    for journal in journals:
        for line in journal.read_text().splitlines():
            pid, start, end = line.split()
            intervals.append((float(start), float(end), int(pid)))
    return sorted(intervals)


def assert_no_overlap(intervals: list[tuple[float, float, int]]) -> None:
    """No critical section started before the previous one ended (one monotonic clock)."""
    for (start, end, pid), (next_start, next_end, next_pid) in itertools.pairwise(intervals):
        assert end < next_start, (
            f"pid {pid} held [{start}, {end}] while pid {next_pid} held [{next_start}, {next_end}]"
        )


def assert_exclusive_counting(journals: list[Path], counter: Path, expected: int) -> None:
    """``expected`` critical sections, none overlapping, and not one lost counter update."""
    intervals = read_intervals(journals)
    assert len(intervals) == expected
    assert_no_overlap(intervals)
    assert int(counter.read_text()) == expected
