"""Isolated Celery tasks on a real worker: prefork, two children, the local Redis as broker.

One worker serves the whole module (tests/celery_app.py's tasks, on a queue and under a kombu
key prefix of this run's own). What happened is read from the journal the tasks write
(tests/taskwork.py): a task that ran has ``start`` and ``end`` events, a skipped one only the
``skipped`` event of its ``lock_skipped`` signal and Celery's ``returned``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from django_isolatable import CommandIsolation
from tests import services
from tests.settings import KEY_PREFIX
from tests.taskwork import (
    JOURNAL_ENV,
    ROOT,
    await_event,
    events,
    interval,
    of_task,
    require_package,
    start_worker,
    stop_worker,
)

RESULT_TIMEOUT = 30  # seconds: only a hang should ever hit it


@dataclass
class CeleryWorker:
    process: subprocess.Popen[bytes]
    prefix: str
    journal: Path
    directory: Path
    env: dict[str, str]

    def started(self, result: Any) -> dict[str, Any]:
        """The ``start`` event of the task behind ``result``, once its work began."""
        return await_event(self.journal, lambda e: e["event"] == "start" and e["task"] == result.id)

    def returned(self, result: Any) -> Any:
        """What the task behind ``result`` returned, once Celery's ``task_postrun`` journalled
        it (after the result was stored: ``get()`` may return before)."""
        value = result.get(timeout=RESULT_TIMEOUT)
        await_event(self.journal, lambda e: e["event"] == "returned" and e["task"] == result.id
                    and e["state"] == "SUCCESS")  # fmt: skip
        return value

    def gate(self, name: str) -> Path:
        return self.directory / f"gate-{name}"

    def log(self) -> str:
        return (self.directory / "worker.log").read_text()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryWorker]:
    require_package("celery")
    services.require("redis")
    import redis

    from tests import celery_app

    directory = tmp_path_factory.mktemp("celery")
    prefix = f"{KEY_PREFIX}celery-{uuid.uuid4().hex[:12]}:"
    isolatable = {"LOCK_DIR": str(directory / "locks"), "REDIS_URL": services.REDIS_URL,
                  "KEY_PREFIX": prefix}  # fmt: skip
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable),
        celery_app.PREFIX_ENV: prefix,
        JOURNAL_ENV: str(directory / "journal"),
    }
    celery_app.configure(prefix)
    process = start_worker(
        [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "--pool=prefork",
         "--concurrency=2", "--loglevel=INFO", "--hostname", f"{prefix}worker@%h",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env, directory / "worker.log",
    )  # fmt: skip
    client = redis.Redis.from_url(services.REDIS_URL)
    try:
        found = CeleryWorker(process, prefix, directory / "journal", directory, env)
        try:
            assert celery_app.ping.delay().get(timeout=RESULT_TIMEOUT) == "pong"
        except Exception:
            pytest.fail(f"the Celery worker did not answer; its log:\n{found.log()}")
        yield found
    finally:
        stop_worker(process)  # SIGTERM: Celery's warm shutdown
        celery_app.app.close()
        for key in client.scan_iter(f"{prefix}*", count=500):
            client.delete(key)
        client.close()
    assert process.returncode == 0, found.log()


def locks_status(worker: CeleryWorker, name: str, *options: str) -> list[dict[str, Any]]:
    """``manage.py locks status NAME --json`` run with the worker's settings."""
    finished = subprocess.run(
        [sys.executable, "-m", "django", "locks", "status", name, "--json", *options],
        cwd=ROOT, env=worker.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    rows: list[dict[str, Any]] = json.loads(finished.stdout)
    return rows


def test_a_second_task_for_the_same_account_is_skipped(worker: CeleryWorker) -> None:
    from tests.celery_app import sync_account

    gate = worker.gate("same-account")
    first = sync_account.delay(1, str(gate))
    holder = worker.started(first)
    assert holder["guard_label"] == f"celery {first.id}"  # current_guard() inside the task
    second = sync_account.delay(1, str(gate))
    assert worker.returned(second) is None  # skipped: returned without running
    gate.touch()
    assert worker.returned(first) == "synced 1"

    assert of_task(worker.journal, first.id) == ["start", "end", "returned"]
    assert of_task(worker.journal, second.id) == ["skipped", "returned"]
    (skip,) = [e for e in events(worker.journal) if e["event"] == "skipped"
               and e["task"] == second.id]  # fmt: skip
    # Skipped in the other child, at the same time, because the first task held the lock.
    assert skip["pid"] != holder["pid"]
    assert skip["name"] == "sync:1"
    assert skip["holder_pid"] == holder["pid"]
    assert skip["holder_label"] == f"celery {first.id}"
    start, end = interval(worker.journal, first.id)
    assert start < skip["at"] < end


def test_different_accounts_run_side_by_side(worker: CeleryWorker) -> None:
    from tests.celery_app import sync_account

    gate = worker.gate("two-accounts")
    two, three = sync_account.delay(2, str(gate)), sync_account.delay(3, str(gate))
    assert worker.started(two)["pid"] != worker.started(three)["pid"]
    gate.touch()  # both are running now: each holds its own account's lock
    assert worker.returned(two) == "synced 2"
    assert worker.returned(three) == "synced 3"
    (start_two, end_two), (start_three, end_three) = (
        interval(worker.journal, two.id),
        interval(worker.journal, three.id),
    )
    assert max(start_two, start_three) < min(end_two, end_three), "the runs did not overlap"


@pytest.mark.parametrize("strategy", ["file", "redis"])
def test_locks_status_shows_the_running_tasks_label(worker: CeleryWorker, strategy: str) -> None:
    from tests.celery_app import sync_account, sync_account_redis

    task = sync_account if strategy == "file" else sync_account_redis
    gate = worker.gate(f"status-{strategy}")
    running = task.delay(4, str(gate))
    holder = worker.started(running)
    try:
        (row,) = locks_status(worker, "sync:4", "--strategy", strategy)
    finally:
        gate.touch()
    assert row["state"] == "held"
    assert row["pid"] == holder["pid"]
    assert row["label"] == f"celery {running.id}"
    assert worker.returned(running) == "synced 4"
    assert locks_status(worker, "sync:4", "--strategy", strategy)[0]["state"] == "free"


@pytest.mark.parametrize("strategy", ["file", "redis"])
def test_a_killed_worker_child_does_not_block_the_next_task(
    worker: CeleryWorker, strategy: str, settings: Any
) -> None:
    from tests.celery_app import sync_account, sync_account_redis

    task = sync_account if strategy == "file" else sync_account_redis
    account = 5 if strategy == "file" else 6
    gate = worker.gate(f"killed-{strategy}")
    doomed = task.delay(account, str(gate))
    holder = worker.started(doomed)
    os.kill(holder["pid"], signal.SIGKILL)
    doomed.get(timeout=RESULT_TIMEOUT, propagate=False)
    assert doomed.state == "FAILURE"  # Celery's WorkerLostError: acks_late is off
    assert "WorkerLostError" in repr(doomed.result)

    # The dead child's record is still there: the next task must take over from it.
    settings.ISOLATABLE = json.loads(worker.env["ISOLATABLE_TEST_SETTINGS"])
    left = CommandIsolation(f"sync:{account}", strategy=strategy).holder()
    assert left is not None
    assert (left.pid, left.alive) == (holder["pid"], False)

    gate.touch()
    following = task.delay(account, str(gate))
    assert worker.returned(following) == f"synced {account}"
    assert of_task(worker.journal, following.id) == ["start", "end", "returned"]
    assert of_task(worker.journal, doomed.id) == ["start"]


def test_raise_and_autoretry_defers_the_task_instead_of_dropping_it(
    worker: CeleryWorker,
) -> None:
    from tests.celery_app import sync_account, sync_account_later

    gate = worker.gate("retry")
    first = sync_account.delay(7, str(gate))
    worker.started(first)
    later = sync_account_later.delay(7, str(gate))
    await_event(
        worker.journal,
        lambda e: e["event"] == "returned" and e["task"] == later.id and e["state"] == "RETRY",
    )
    gate.touch()
    assert worker.returned(first) == "synced 7"
    assert worker.returned(later) == "synced 7"
    assert of_task(worker.journal, later.id)[-3:] == ["start", "end", "returned"]
    assert interval(worker.journal, first.id)[1] < interval(worker.journal, later.id)[0]


def test_acks_late_runs_a_killed_childs_task_again_at_once(worker: CeleryWorker) -> None:
    from tests.celery_app import sync_account_acks_late

    gate = worker.gate("acks-late")
    task = sync_account_acks_late.delay(8, str(gate))
    first_run = worker.started(task)
    os.kill(first_run["pid"], signal.SIGKILL)
    gate.touch()  # for the next run
    # Delivered again (reject_on_worker_lost): the lock the dead child held is free at once.
    assert worker.returned(task) == "synced 8"
    assert of_task(worker.journal, task.id) == ["start", "start", "end", "returned"]
