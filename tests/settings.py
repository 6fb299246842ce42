"""Settings for the test suite: the app, an in-memory SQLite database, no server needed."""

import json
import os
import tempfile

try:  # the MariaDB/MySQL tests use PyMySQL (pure Python) as Django's MySQLdb
    import pymysql  # type: ignore[import-untyped]

    pymysql.install_as_MySQLdb()
except ImportError:
    pass

# One id per test session, inherited by the processes the tests spawn: it names the SQLite
# file and the key prefixes on shared servers, so parallel sessions never meet. Each pytest-xdist
# worker is a session of its own (the workers inherit the id of the run that started them).
SESSION = os.environ.setdefault("ISOLATABLE_TEST_SESSION", f"{os.getpid()}")
if "PYTEST_XDIST_WORKER" in os.environ:
    SESSION += f"-{os.environ['PYTEST_XDIST_WORKER']}"
SQLITE_PATH = os.path.join(tempfile.gettempdir(), f"isolatable-tests-{SESSION}.sqlite3")
KEY_PREFIX = f"isolatable-tests-{SESSION}:"

SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",  # the "Locks" page: tests/test_admin.py, tests/test_admin_browser.py
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_isolatable",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    # Real servers for the postgres and database strategies; tests skip when they are down.
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("TEST_POSTGRES_DB", "test"),
        "USER": os.environ.get("TEST_POSTGRES_USER", "postgres"),
        "PASSWORD": os.environ.get("TEST_POSTGRES_PASSWORD", ""),
        "HOST": os.environ.get("TEST_POSTGRES_HOST", "127.0.0.1"),
        "PORT": os.environ.get("TEST_POSTGRES_PORT", "5432"),
    },
    "mariadb": {
        "ENGINE": "django.db.backends.mysql",
        "NAME": os.environ.get("TEST_MARIADB_DB", "test"),
        "USER": os.environ.get("TEST_MARIADB_USER", "root"),
        "PASSWORD": os.environ.get("TEST_MARIADB_PASSWORD", ""),
        "HOST": os.environ.get("TEST_MARIADB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("TEST_MARIADB_PORT", "3306"),
        "OPTIONS": {"charset": "utf8mb4"},
    },
    "sqlite": {"ENGINE": "django.db.backends.sqlite3", "NAME": SQLITE_PATH},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Processes that tests spawn get their strategy's settings through the environment.
ISOLATABLE: dict[str, object] = json.loads(os.environ.get("ISOLATABLE_TEST_SETTINGS", "{}"))
LOGGING_CONFIG = None

CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "redis": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "KEY_PREFIX": KEY_PREFIX,
    },
}
