"""Where the benchmarks run: Django settings, which servers and peers are there, and cleanup.

Servers come from the same environment variables as the test suite (``TEST_REDIS_URL``,
``TEST_POSTGRES_HOST`` ...). Everything a run creates on them is namespaced by ``KEY_PREFIX``,
unique per run, and removed by ``leave_as_found``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import django
from django.conf import settings
from django.db import DatabaseError, connections
from django.test import override_settings

from benchmarks.wire import CountingProxy
from django_isolatable import CommandIsolation
from django_isolatable.backends import Backend, backend_for

ROOT = Path(__file__).resolve().parent.parent
KEY_PREFIX = f"isolatable-bench-{os.getpid()}-{secrets.token_hex(3)}:"
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LOCK_TABLE = "django_isolatable_lock"
CONNECT_TIMEOUT = 5  # seconds: a server that does not answer is skipped, not waited for
SERVER_DATABASES = ("postgres", "mariadb")
PEERS = {"filelock": "filelock", "portalocker": "portalocker", "python-redis-lock": "redis_lock"}

#: Round trips are counted through two proxies per server (see ``wire``): a holder's, a waiter's.
COUNTED = 2

_names: set[str] = set()
_proxies: dict[tuple[str, int], CountingProxy] = {}
_tables_before: dict[str, bool] = {}
_work_dir: list[Path] = []


def configure(work_dir: Path) -> None:
    """Configure Django for a run whose files live in ``work_dir``, and set it up."""
    with contextlib.suppress(ImportError):  # MariaDB through PyMySQL, as the test suite does
        import pymysql  # type: ignore[import-untyped]

        pymysql.install_as_MySQLdb()
    _work_dir.append(work_dir)
    env = os.environ.get
    postgres: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": env("TEST_POSTGRES_DB", "test"),
        "USER": env("TEST_POSTGRES_USER", "postgres"),
        "PASSWORD": env("TEST_POSTGRES_PASSWORD", ""),
        "HOST": env("TEST_POSTGRES_HOST", "127.0.0.1"),
        "PORT": env("TEST_POSTGRES_PORT", "5432"),
        "OPTIONS": {"connect_timeout": CONNECT_TIMEOUT},
    }
    counted = {}
    if postgres["HOST"] and not postgres["HOST"].startswith("/"):  # a proxy forwards TCP only
        for number in range(COUNTED):
            proxy = _proxy("postgres", number, postgres["HOST"], int(postgres["PORT"]))
            counted[counted_alias(number)] = {
                **postgres,
                "HOST": "127.0.0.1",
                "PORT": str(proxy.port),
            }
    settings.configure(
        SECRET_KEY="benchmarks-only",
        USE_TZ=True,
        INSTALLED_APPS=["django_isolatable"],
        DATABASES={
            "default": {},
            "postgres": postgres,
            **counted,
            "mariadb": {
                "ENGINE": "django.db.backends.mysql",
                "NAME": env("TEST_MARIADB_DB", "test"),
                "USER": env("TEST_MARIADB_USER", "root"),
                "PASSWORD": env("TEST_MARIADB_PASSWORD", ""),
                "HOST": env("TEST_MARIADB_HOST", "127.0.0.1"),
                "PORT": env("TEST_MARIADB_PORT", "3306"),
                "OPTIONS": {"connect_timeout": CONNECT_TIMEOUT},
            },
            "sqlite": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(work_dir / "db.sqlite3"),
            },
        },
        CACHES={
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": REDIS_URL,
                "KEY_PREFIX": KEY_PREFIX,
            }
        },
        ISOLATABLE={
            "LOCK_DIR": str(work_dir / "locks"),
            "KEY_PREFIX": KEY_PREFIX,
            "REDIS_URL": REDIS_URL,
            "CACHE_ALIAS": "default",
            "DATABASE_ALIAS": "postgres",
        },
    )
    django.setup()
    for alias in SERVER_DATABASES:
        if unavailable(alias) is None:
            _tables_before[alias] = _has_lock_table(alias)


def _proxy(server: str, number: int, host: str, port: int) -> CountingProxy:
    proxy = _proxies[server, number] = CountingProxy(host, port)
    return proxy


def counted_alias(number: int) -> str:
    """A database alias of the ``postgres`` database reached through proxy ``number``."""
    return f"postgres-counted-{number}"


def counted_redis_url(number: int) -> str | None:
    """``REDIS_URL`` through proxy ``number`` (made on first use), or None for a unix socket."""
    parts = urlsplit(REDIS_URL)
    if parts.scheme != "redis" or parts.hostname is None:
        return None
    proxy = _proxies.get(("redis", number)) or _proxy(
        "redis", number, parts.hostname, parts.port or 6379
    )
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{proxy.port}" if userinfo else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def proxy(server: str, number: int) -> CountingProxy | None:
    """The proxy ``number`` to ``server`` ("redis", "postgres"), if there is one."""
    return _proxies.get((server, number))


def lock_name(slug: str) -> str:
    """The lock name for one measurement (remembered, so its rows can be cleaned up)."""
    name = f"bench-{slug}"
    _names.add(name)
    return name


class _Pinned(CommandIsolation):
    """A ``CommandIsolation`` that keeps the backend it was given (a plain one builds its
    backend again whenever ``ISOLATABLE`` changes)."""

    def __init__(self, name: str, strategy: str, backend: Backend, max_holders: int) -> None:
        super().__init__(name, strategy=strategy, max_holders=max_holders)
        self._pinned = backend

    @property
    def backend(self) -> Backend:
        return self._pinned


def isolation(
    slug: str, strategy: str, *, max_holders: int = 1, **isolatable: Any
) -> CommandIsolation:
    """A ``CommandIsolation`` (a semaphore of ``max_holders``) whose backend is made with
    ``isolatable`` settings on top, and kept: one run holds locks on several database aliases
    side by side."""
    with override_settings(ISOLATABLE={**settings.ISOLATABLE, **isolatable}):
        return _Pinned(lock_name(slug), strategy, backend_for(strategy), max_holders)


def work_file(name: str) -> str:
    """A path in this run's directory (removed at the end of the run)."""
    return str(_work_dir[-1] / name)


def ensure_lock_table(alias: str) -> None:
    """Have the database strategy create its table on ``alias`` if it is missing."""
    isolation("table", "database", DATABASE_ALIAS=alias).try_lock().release()


def advisory_key(slug: str) -> int:
    """A bigint advisory lock key of this run."""
    digest = hashlib.sha256(f"{KEY_PREFIX}{slug}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def name_hash(name: str) -> str:
    """The lock table's key of ``name`` (how the database strategy computes it)."""
    return hashlib.sha256((KEY_PREFIX + name).encode()).hexdigest()


def postgres_params() -> dict[str, Any]:
    """psycopg connection parameters of the ``postgres`` database."""
    database = settings.DATABASES["postgres"]
    return {
        "host": database["HOST"],
        "port": database["PORT"],
        "user": database["USER"],
        "password": database["PASSWORD"],
        "dbname": database["NAME"],
        "connect_timeout": CONNECT_TIMEOUT,
    }


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=CONNECT_TIMEOUT)


@functools.cache
def unavailable(what: str) -> str | None:
    """Why ``what`` (a server: redis, postgres, mariadb, sqlite; or a peer) cannot be measured."""
    if what in PEERS:
        if importlib.util.find_spec(PEERS[what]) is None:
            return f"{what} is not installed (pip install -r benchmarks/requirements.txt)"
        return None
    if what == "redis":
        if importlib.util.find_spec("redis") is None:
            return "redis-py is not installed"
        client = redis_client()
        try:
            client.ping()
        except Exception as e:
            return f"Redis at {REDIS_URL} is unreachable ({e})"
        finally:
            client.close()
        return None
    driver = {"postgres": "psycopg", "mariadb": "MySQLdb", "sqlite": "sqlite3"}[what]
    if importlib.util.find_spec(driver) is None:
        return f"{what}: the {driver} driver is not installed"
    try:
        connections[what].ensure_connection()
    except Exception as e:
        return f"{what} is unreachable ({str(e).strip().splitlines()[0]})"
    return None


def versions() -> str:
    """One line naming the versions of what is measured."""
    found = []
    for package in ("Django", "redis", "psycopg", "PyMySQL", *PEERS):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found.append(f"{package} {importlib.metadata.version(package)}")
    servers = []
    if unavailable("redis") is None:
        client = redis_client()
        servers.append(f"Redis {client.info('server')['redis_version']}")
        client.close()
    for alias, label in (("postgres", "PostgreSQL"), ("mariadb", "MariaDB")):
        if unavailable(alias) is None:
            version = connections[alias].get_database_version()
            servers.append(f"{label} {'.'.join(map(str, version[:2]))}")
    return ", ".join(found + servers)


def commit() -> str:
    """The measured code's git commit, "+ changes" if the work tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "django_isolatable"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + changes to django_isolatable/' if changed else ''}"


def _has_lock_table(alias: str) -> bool:
    return LOCK_TABLE in connections[alias].introspection.table_names()


def leave_as_found() -> None:
    """Delete this run's Redis keys and lock rows; drop the lock table if this run created it."""
    if unavailable("redis") is None:
        client = redis_client()
        for key in client.scan_iter(f"*{KEY_PREFIX}*", count=1000):
            client.delete(key)
        client.close()
    hashes = [name_hash(name) for name in _names]
    for alias in (*SERVER_DATABASES, "sqlite"):
        if unavailable(alias) is not None or not hashes:
            continue
        with contextlib.suppress(DatabaseError), connections[alias].cursor() as cursor:
            if not _has_lock_table(alias):
                continue
            if alias in _tables_before and not _tables_before[alias]:
                cursor.execute(f"DROP TABLE {LOCK_TABLE}")
            else:
                placeholders = ", ".join(["%s"] * len(hashes))
                cursor.execute(
                    f"DELETE FROM {LOCK_TABLE} WHERE name_hash IN ({placeholders})", hashes
                )
    connections.close_all()
    while _proxies:
        _proxies.popitem()[1].close()
