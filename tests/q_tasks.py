"""The django-q2 tasks of tests/test_task_queues.py, run by ``qcluster`` (tests.q_settings).

django-q2 calls plain functions by dotted path, so ``isolated`` is the only decorator. The
worker's ``pre_execute`` signal tells the running task's id (to name it in the journal), its
``post_execute_in_worker`` signal what the task returned.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver
from django_q.signals import post_execute_in_worker, pre_execute

from django_isolatable import isolated
from django_isolatable.signals import lock_skipped
from tests.taskwork import journal, work

running: dict[str, str] = {}  # the id of the task this worker process runs now


@isolated("sync:{account_id}", label="django-q account {account_id}")
def sync_account(account_id: int, gate: str) -> str:
    return work(running["id"], account_id, gate)


def ping() -> str:
    return "pong"


@receiver(pre_execute)
def note_task(sender: Any, task: dict[str, Any], **_: Any) -> None:
    running["id"] = task["id"]


@receiver(post_execute_in_worker)
def journal_return(sender: Any, task: dict[str, Any], **_: Any) -> None:
    journal("returned", task=task["id"], value=task["result"], success=task["success"])


@receiver(lock_skipped)
def journal_skip(sender: Any, name: str, holder: Any = None, **_: Any) -> None:
    journal(
        "skipped",
        task=running.get("id"),
        name=name,
        holder_pid=None if holder is None else holder.pid,
    )
