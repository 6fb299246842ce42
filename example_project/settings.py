"""Settings of the example project. Every value can come from the environment (django-environ);
with no environment at all it uses the file strategy and a SQLite database beside this file."""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent

env = environ.Env(
    DEBUG=(bool, False),
    ISOLATABLE_STRATEGY=(str, "file"),
    ISOLATABLE_LOCK_DIR=(str, str(BASE_DIR / ".locks")),
    ISOLATABLE_TTL=(float, 60.0),
    ISOLATABLE_SKIPPED_EXIT_CODE=(int, 0),
    ISOLATABLE_MAX_AGE=(float, None),  # seconds; unset: no limit
    ISOLATABLE_OVERDUE_EXIT_CODE=(int, 2),
    REDIS_URL=(str, "redis://127.0.0.1:6379/0"),
)
environ.Env.read_env(BASE_DIR / ".env")  # optional; absent is fine

SECRET_KEY = env("SECRET_KEY", default="example-project-not-secret")
DEBUG = env("DEBUG")
ALLOWED_HOSTS: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = [
    "django_isolatable.contrib.migrate",  # first: its `migrate` waits and locks per database
    "django.contrib.admin",  # /admin/: the "Locks" page (DEBUG=1 manage.py runserver)
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_isolatable",
    "example_project.jobs",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
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
ROOT_URLCONF = "example_project.urls"
STATIC_URL = "/static/"

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

ISOLATABLE = {
    "STRATEGY": env("ISOLATABLE_STRATEGY"),
    "LOCK_DIR": env("ISOLATABLE_LOCK_DIR"),
    "TTL": env("ISOLATABLE_TTL"),
    "REDIS_URL": env("REDIS_URL"),
    "SKIPPED_EXIT_CODE": env("ISOLATABLE_SKIPPED_EXIT_CODE"),
    "MAX_AGE": env("ISOLATABLE_MAX_AGE"),
    "OVERDUE_EXIT_CODE": env("ISOLATABLE_OVERDUE_EXIT_CODE"),
}

# Read by example_project/celery.py only (Celery is optional; `make demo` does not use it).
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=env("REDIS_URL"))
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=env("REDIS_URL"))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_isolatable": {"handlers": ["console"], "level": env("LOG_LEVEL", default="WARNING")}
    },
}
