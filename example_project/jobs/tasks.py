"""Celery tasks of the example project (see example_project/celery.py; Celery is optional).

One sync per account at a time, on every worker that shares the lock strategy: a second
`sync_account.delay(42)` while the first runs returns None at once, and
`python manage.py locks status` shows the running task's id as the lock's label.
"""

import time

from celery import shared_task

from django_isolatable import isolated


@shared_task(bind=True)
@isolated("sync:{account_id}", label="celery {self.request.id}")
def sync_account(self, account_id, seconds=3.0):
    time.sleep(seconds)
    return f"synced {account_id}"
