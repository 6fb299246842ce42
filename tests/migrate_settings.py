"""Settings of the project that tests/test_contrib_migrate.py runs as real ``migrate`` and
``test`` processes: ``django_isolatable.contrib.migrate`` first in INSTALLED_APPS, the database
and the ISOLATABLE setting from the environment (``ISOLATABLE_MIGRATE_DATABASE`` and
``ISOLATABLE_TEST_SETTINGS``, both JSON), and ``tests.migrategate``, whose migration can stop a
run half-way."""

import json
import os

SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS = [
    "django_isolatable.contrib.migrate",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django_isolatable",
    "tests.migrategate",
]
DATABASES = {"default": json.loads(os.environ["ISOLATABLE_MIGRATE_DATABASE"])}
ISOLATABLE: dict[str, object] = json.loads(os.environ.get("ISOLATABLE_TEST_SETTINGS", "{}"))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING_CONFIG = None
