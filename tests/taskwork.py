"""The work that the task-queue tests' tasks do, the journal that proves what happened, and
starting and stopping the queues' workers.

Every task of tests/celery_app.py, tests/huey_app.py, tests/dramatiq_app.py and
tests/q_tasks.py calls ``work()``: it appends a ``start`` event to the journal (a JSON line with
the task, the account, the worker process's pid and the time on the system's one monotonic
clock), waits until the test creates its gate file, then appends ``end``. A skipped call never
reaches ``work()``, so its task has no ``start`` event; each queue's own hook (a signal or a
middleware) appends ``returned`` with what the task returned. The journal is one file opened in
append mode by every worker process: each event is one short ``write``, so lines never mix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The journal's path, given to the worker processes through the environment.
JOURNAL_ENV = "ISOLATABLE_TASKS_JOURNAL"
GATE_TIMEOUT = 30.0  # seconds a task waits for its gate: only a broken test should hit it
EVENT_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
ROOT = Path(__file__).resolve().parent.parent


def journal(event: str, **fields: Any) -> None:
    """Append one event to the journal named by ``$ISOLATABLE_TASKS_JOURNAL``."""
    line = json.dumps({"event": event, "pid": os.getpid(), "at": time.monotonic(), **fields})
    fd = os.open(os.environ[JOURNAL_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def in_worker() -> bool:
    """True in a queue's worker process (its environment names the journal)."""
    return JOURNAL_ENV in os.environ


def work(task: str, account_id: int, gate: str) -> str:
    """What an isolated task does: journal ``start`` (with the label of ``current_guard()``),
    wait for ``gate`` to exist, journal ``end``; returns ``"synced <account_id>"``."""
    from django_isolatable import current_guard

    guard = current_guard()
    journal("start", task=task, account=account_id, guard_label=guard and guard.info.label)
    deadline = time.monotonic() + GATE_TIMEOUT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    journal("end", task=task, account=account_id, gate_open=os.path.exists(gate))
    return f"synced {account_id}"


def events(path: Path) -> list[dict[str, Any]]:
    """Every event in the journal at ``path``, in the order written."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def await_event(
    path: Path, predicate: Callable[[dict[str, Any]], bool], timeout: float = EVENT_TIMEOUT
) -> dict[str, Any]:
    """The first event in the journal for which ``predicate`` is true, once it was written."""
    deadline = time.monotonic() + timeout
    while True:
        for event in events(path):
            if predicate(event):
                return event
        if time.monotonic() > deadline:
            raise AssertionError(f"no such event within {timeout} s; journal: {events(path)}")
        time.sleep(0.01)


def of_task(path: Path, task: str) -> list[str]:
    """The event names journalled for ``task``, in order."""
    return [event["event"] for event in events(path) if event.get("task") == task]


def interval(path: Path, task: str) -> tuple[float, float]:
    """When ``task`` started and ended its work, on the monotonic clock."""
    times = {event["event"]: event["at"] for event in events(path) if event.get("task") == task}
    return times["start"], times["end"]


def require_package(module: str) -> None:
    """Skip the test when ``module`` is not installed (``pip install -e .[queues]``), or fail
    it under ISOLATABLE_REQUIRE_SERVICES=1, as CI runs, so a missing install is not hidden."""
    import importlib.util

    import pytest

    if importlib.util.find_spec(module) is not None:
        return
    reason = f"{module} is not installed (the queues extra: pip install -e '.[queues]')"
    if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and ISOLATABLE_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


def start_worker(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A queue's worker process, in a session of its own, its output in ``log``."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def stop_worker(process: subprocess.Popen[bytes], graceful: int = signal.SIGTERM) -> None:
    """The queue's graceful-shutdown signal, then, after STOP_TIMEOUT, SIGKILL to its group."""
    if process.poll() is None:
        process.send_signal(graceful)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_TIMEOUT)
