"""The Dramatiq app of tests/test_task_queues.py: ``dramatiq tests.dramatiq_app``.

A ``RedisBroker`` whose namespace is this test session's (its keys start with it), with the
``CurrentMessage`` middleware (a task's message id names it in the journal) and a middleware that
journals what each actor returned. Django is set up when the module is imported, as
django-dramatiq does in a project.
"""

from __future__ import annotations

import os
from typing import Any

import django
import dramatiq
from django.apps import apps
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage, Middleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
if not apps.ready:  # the worker's import; the test process has Django set up already
    django.setup()

from django_isolatable import isolated
from django_isolatable.signals import lock_skipped
from tests.services import REDIS_URL
from tests.settings import KEY_PREFIX
from tests.taskwork import in_worker, journal, work

NAMESPACE = f"{KEY_PREFIX}dramatiq"


class JournalReturns(Middleware):
    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
    ) -> None:
        journal("returned", task=message.message_id, value=result, error=repr(exception))


broker = RedisBroker(url=REDIS_URL, namespace=NAMESPACE)
broker.add_middleware(CurrentMessage())
broker.add_middleware(JournalReturns())
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
@isolated("sync:{account_id}", label="dramatiq account {account_id}")
def sync_account(account_id: int, gate: str) -> str:
    message = CurrentMessage.get_current_message()
    assert message is not None
    return work(message.message_id, account_id, gate)


@dramatiq.actor(max_retries=0)
def ping() -> str:
    return "pong"


def journal_skip(sender: Any, name: str, holder: Any = None, **_: Any) -> None:
    message = CurrentMessage.get_current_message()
    journal(
        "skipped",
        task=None if message is None else message.message_id,
        name=name,
        holder_pid=None if holder is None else holder.pid,
    )


if in_worker():  # the test process imports this module too: its signals stay as they were
    lock_skipped.connect(journal_skip)
