"""Celery for the example project: optional, and not part of `make demo`.

Nothing imports this module but Celery's own command line, so the project works without Celery
installed. With it (`pip install "celery[redis]"`) and a Redis on 127.0.0.1:6379:

    celery -A example_project worker --pool=prefork --concurrency=2 --loglevel=INFO

and, in another terminal, two syncs of one account at once (the second one is skipped):

    python manage.py shell -c "from example_project.jobs.tasks import sync_account; \\
        first, second = sync_account.delay(42), sync_account.delay(42); \\
        print(second.get(timeout=30), first.get(timeout=30))"
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
