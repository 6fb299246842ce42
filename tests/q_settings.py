"""tests.settings plus django-q2, for the cluster of tests/test_task_queues.py (``qcluster``)."""

from tests.services import REDIS_URL
from tests.settings import *  # noqa: F403
from tests.settings import INSTALLED_APPS, KEY_PREFIX

INSTALLED_APPS = [*INSTALLED_APPS, "django_q"]
# The Redis broker under a name of this session's own (keys "django_q:<name>:..."). Successful
# tasks are not saved (save_limit -1) and no schedule is read, so the cluster needs no table:
# the journal of tests/taskwork.py shows what each task returned.
Q_CLUSTER = {
    "name": f"{KEY_PREFIX}q",
    "workers": 2,
    "redis": REDIS_URL,
    "timeout": 60,
    "retry": 120,
    "max_attempts": 1,
    "save_limit": -1,
    "scheduler": False,
    "catch_up": False,
}
