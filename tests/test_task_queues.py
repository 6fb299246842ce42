"""Isolated tasks on Huey, Dramatiq and django-q2: each queue's real worker, the local Redis.

One test per queue, on the queue's own consumer process: a task for account 1 holds its lock
while a second task for account 1 is skipped (the function never ran: no ``start`` in the
journal of tests/taskwork.py; the ``lock_skipped`` signal names the holder) and a task for
account 2 runs alongside it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from tests import services
from tests.taskwork import (
    JOURNAL_ENV,
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
class QueueWorker:
    journal: Path
    directory: Path

    def started(self, task: str) -> dict[str, Any]:
        return await_event(self.journal, lambda e: e["event"] == "start" and e["task"] == task)

    def log(self) -> str:
        return (self.directory / "worker.log").read_text()


def worker_env(directory: Path, **extra: str) -> dict[str, str]:
    """The environment of a queue's worker: tests.settings, this run's LOCK_DIR and journal."""
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ISOLATABLE_TEST_SETTINGS": json.dumps({"LOCK_DIR": str(directory / "locks")}),
        JOURNAL_ENV: str(directory / "journal"),
        **extra,
    }


def delete_keys(pattern: str) -> None:
    import redis

    client = redis.Redis.from_url(services.REDIS_URL)
    for key in client.scan_iter(pattern, count=500):
        client.delete(key)
    client.close()


def assert_skipped_and_side_by_side(
    worker: QueueWorker, holder: dict[str, Any], skipped: str, first: str, other: str
) -> None:
    """``skipped`` never ran, its skip named ``first``'s process as the holder; ``other`` (the
    other account) ran while ``first`` held account 1."""
    assert of_task(worker.journal, first)[:2] == ["start", "end"]
    assert "start" not in of_task(worker.journal, skipped)
    skips = [e for e in events(worker.journal) if e["event"] == "skipped"]
    assert [(e["name"], e["holder_pid"]) for e in skips] == [("sync:1", holder["pid"])]
    (start_first, end_first), (start_other, end_other) = (
        interval(worker.journal, first),
        interval(worker.journal, other),
    )
    assert start_first < skips[0]["at"] < end_first
    assert max(start_first, start_other) < min(end_first, end_other), "no overlap"


# Huey -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huey_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueWorker]:
    require_package("huey")
    services.require("redis")
    from tests import huey_app

    directory = tmp_path_factory.mktemp("huey")
    process = start_worker(
        [sys.executable, "-m", "huey.bin.huey_consumer", "tests.huey_app.huey",
         "--workers", "2", "--worker-type", "process"],
        worker_env(directory), directory / "worker.log",
    )  # fmt: skip
    found = QueueWorker(directory / "journal", directory)
    try:
        try:
            assert huey_app.ping().get(blocking=True, timeout=RESULT_TIMEOUT) == "pong"
        except Exception:
            pytest.fail(f"the Huey consumer did not answer; its log:\n{found.log()}")
        yield found
    finally:
        stop_worker(process, graceful=2)  # SIGINT: Huey's graceful shutdown
        delete_keys(f"huey.*.{huey_app.huey.name}*")
    assert process.returncode == 0, found.log()


def test_huey(huey_worker: QueueWorker) -> None:
    from tests.huey_app import sync_account

    gate = huey_worker.directory / "gate"
    first = sync_account(1, str(gate))
    holder = huey_worker.started(first.id)
    assert holder["guard_label"] == f"huey {first.id}"
    skipped = sync_account(1, str(gate))
    assert skipped.get(blocking=True, timeout=RESULT_TIMEOUT) is None
    other = sync_account(2, str(gate))
    huey_worker.started(other.id)
    gate.touch()
    assert first.get(blocking=True, timeout=RESULT_TIMEOUT) == "synced 1"
    assert other.get(blocking=True, timeout=RESULT_TIMEOUT) == "synced 2"
    assert_skipped_and_side_by_side(huey_worker, holder, skipped.id, first.id, other.id)


# Dramatiq ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dramatiq_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QueueWorker]:
    require_package("dramatiq")
    services.require("redis")
    from tests import dramatiq_app

    directory = tmp_path_factory.mktemp("dramatiq")
    process = start_worker(
        [sys.executable, "-m", "dramatiq", "tests.dramatiq_app", "--processes", "1",
         "--threads", "2"],
        worker_env(directory), directory / "worker.log",
    )  # fmt: skip
    found = QueueWorker(directory / "journal", directory)
    try:
        ping = dramatiq_app.ping.send()
        try:
            await_event(found.journal, lambda e: e["task"] == ping.message_id)
        except AssertionError:
            pytest.fail(f"the Dramatiq worker did not answer; its log:\n{found.log()}")
        yield found
    finally:
        stop_worker(process)  # SIGTERM: Dramatiq's graceful shutdown
        delete_keys(f"{dramatiq_app.NAMESPACE}*")
    assert process.returncode == 0, found.log()


def returned(worker: QueueWorker, task: str) -> Any:
    event = await_event(worker.journal, lambda e: e["event"] == "returned" and e["task"] == task)
    assert event["error"] == "None", event
    return event["value"]


def test_dramatiq(dramatiq_worker: QueueWorker) -> None:
    from tests.dramatiq_app import sync_account

    gate = dramatiq_worker.directory / "gate"
    first = sync_account.send(1, str(gate)).message_id
    holder = dramatiq_worker.started(first)
    assert holder["guard_label"] == "dramatiq account 1"
    skipped = sync_account.send(1, str(gate)).message_id
    assert returned(dramatiq_worker, skipped) is None
    other = sync_account.send(2, str(gate)).message_id
    dramatiq_worker.started(other)
    gate.touch()
    assert returned(dramatiq_worker, first) == "synced 1"
    assert returned(dramatiq_worker, other) == "synced 2"
    assert_skipped_and_side_by_side(dramatiq_worker, holder, skipped, first, other)


# django-q2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def q_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., str]]:
    """The cluster runs; yields ``enqueue(func, *args) -> task id`` (django-q2's ``async_task``
    in this process, with the cluster's settings)."""
    require_package("django_q")
    services.require("redis")
    from tests import q_settings

    directory = tmp_path_factory.mktemp("django-q")
    env = worker_env(directory, DJANGO_SETTINGS_MODULE="tests.q_settings")
    process = start_worker(
        [sys.executable, "-m", "django", "qcluster"], env, directory / "worker.log"
    )
    found = QueueWorker(directory / "journal", directory)
    apps = [*settings.INSTALLED_APPS, "django_q"]
    try:
        # Q_CLUSTER first: django_q's AppConfig reads it when INSTALLED_APPS brings it in.
        with (
            override_settings(Q_CLUSTER=q_settings.Q_CLUSTER),
            override_settings(INSTALLED_APPS=apps),
        ):
            from django_q.tasks import async_task

            def enqueue(func: str, *args: Any) -> str:
                task_id: str = async_task(func, *args)
                return task_id

            ping = enqueue("tests.q_tasks.ping")
            try:
                await_event(found.journal, lambda e: e["task"] == ping)
            except AssertionError:
                pytest.fail(f"the django-q2 cluster did not answer; its log:\n{found.log()}")
            yield found, enqueue
    finally:
        stop_worker(process)  # SIGTERM: the cluster stops its workers and exits
        delete_keys(f"django_q:{q_settings.Q_CLUSTER['name']}*")
    assert process.returncode == 0, found.log()


def test_django_q2(q_cluster: tuple[QueueWorker, Callable[..., str]]) -> None:
    worker, enqueue = q_cluster
    gate = worker.directory / "gate"
    first = enqueue("tests.q_tasks.sync_account", 1, str(gate))
    holder = worker.started(first)
    assert holder["guard_label"] == "django-q account 1"
    skipped = enqueue("tests.q_tasks.sync_account", 1, str(gate))
    assert q_returned(worker, skipped) is None
    other = enqueue("tests.q_tasks.sync_account", 2, str(gate))
    worker.started(other)
    gate.touch()
    assert q_returned(worker, first) == "synced 1"
    assert q_returned(worker, other) == "synced 2"
    assert_skipped_and_side_by_side(worker, holder, skipped, first, other)


def q_returned(worker: QueueWorker, task: str) -> Any:
    event = await_event(worker.journal, lambda e: e["event"] == "returned" and e["task"] == task)
    assert event["success"], event
    return event["value"]
