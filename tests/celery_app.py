"""The Celery app of tests/test_celery.py: isolated tasks, as a project would write them.

The worker runs ``celery -A tests.celery_app worker`` with ``$ISOLATABLE_CELERY_PREFIX`` set;
the test process calls ``configure()`` with the same prefix. Everything Celery keeps in Redis
(the queue, kombu's bindings, the results) is under that prefix, and the queue is named after
it, so two test runs on one Redis never meet. Django is set up by Celery's Django fix-up, as in
a project (``DJANGO_SETTINGS_MODULE`` set before the app is made).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun

from django_isolatable import isolated
from django_isolatable.errors import AlreadyRunning
from django_isolatable.signals import lock_skipped
from tests.services import REDIS_URL
from tests.taskwork import in_worker, journal, work

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
PREFIX_ENV = "ISOLATABLE_CELERY_PREFIX"

app = Celery("isolatable_tests")


def configure(prefix: str) -> None:
    """Point the app at the local Redis, every key under ``prefix``, its queue named ``prefix``."""
    app.conf.update(
        broker_url=REDIS_URL,
        broker_transport_options={"global_keyprefix": prefix},
        result_backend=REDIS_URL,
        result_backend_transport_options={"global_keyprefix": prefix},
        task_default_queue=prefix,
        worker_prefetch_multiplier=1,  # a busy child never sits on a second task
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )


if PREFIX_ENV in os.environ:
    configure(os.environ[PREFIX_ENV])


@app.task(bind=True)
@isolated("sync:{account_id}", label="celery {self.request.id}")
def sync_account(self: Any, account_id: int, gate: str) -> str:
    """The file strategy (the settings' default): released by the kernel when a child dies."""
    return work(self.request.id, account_id, gate)


@app.task(bind=True)
@isolated("sync:{account_id}", strategy="redis", label="celery {self.request.id}")
def sync_account_redis(self: Any, account_id: int, gate: str) -> str:
    """The redis strategy: a lease, taken over at once from a dead holder on the same host."""
    return work(self.request.id, account_id, gate)


@app.task(bind=True, autoretry_for=(AlreadyRunning,), retry_backoff=0.5, max_retries=20)
@isolated("sync:{account_id}", if_running="raise", label="celery {self.request.id}")
def sync_account_later(self: Any, account_id: int, gate: str) -> str:
    """Deferred, not dropped: a call that finds the lock held is retried by Celery."""
    return work(self.request.id, account_id, gate)


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
@isolated("sync:{account_id}", label="celery {self.request.id}")
def sync_account_acks_late(self: Any, account_id: int, gate: str) -> str:
    """Acknowledged after it ran: the message of a child killed while running is delivered again."""
    return work(self.request.id, account_id, gate)


@app.task
def ping() -> str:
    return "pong"


@task_postrun.connect
def journal_return(task_id: str, retval: Any = None, state: str | None = None, **_: Any) -> None:
    journal("returned", task=task_id, value=retval if state == "SUCCESS" else None, state=state)


def journal_skip(sender: Any, name: str, holder: Any = None, **_: Any) -> None:
    from celery import current_task

    journal(
        "skipped",
        task=current_task.request.id,
        name=name,
        holder_pid=None if holder is None else holder.pid,
        holder_label=None if holder is None else holder.label,
    )


if in_worker():  # the test process imports this module too: its signals stay as they were
    lock_skipped.connect(journal_skip)
