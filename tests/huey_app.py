"""The Huey app of tests/test_task_queues.py: ``huey_consumer tests.huey_app.huey``.

A plain ``RedisHuey`` named after this test session (its keys are ``huey.*.<name>``), with
Django set up when the module is imported, as ``huey.contrib.djhuey`` does in a project.
``store_none=True``: a skipped call returns None, and Huey stores no result for None without it.
"""

from __future__ import annotations

import os
from typing import Any

import django
from django.apps import apps
from huey import RedisHuey

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
if not apps.ready:  # the consumer's import; the test process has Django set up already
    django.setup()

from django_isolatable import isolated
from django_isolatable.signals import lock_skipped
from tests.services import REDIS_URL
from tests.settings import KEY_PREFIX
from tests.taskwork import in_worker, journal, work

huey = RedisHuey(f"{KEY_PREFIX}huey", url=REDIS_URL, store_none=True, utc=True)


@huey.task(context=True)
@isolated("sync:{account_id}", label="huey {task.id}")
def sync_account(account_id: int, gate: str, task: Any = None) -> str:
    return work(task.id, account_id, gate)


@huey.task()
def ping() -> str:
    return "pong"


def journal_skip(sender: Any, name: str, holder: Any = None, **_: Any) -> None:
    journal("skipped", name=name, holder_pid=None if holder is None else holder.pid)


if in_worker():  # the test process imports this module too: its signals stay as they were
    lock_skipped.connect(journal_skip)
