"""The locks compared across processes (handoff, contention), each behind acquire/release.

A ``Candidate`` is opened in the process that uses it, after ``fork``: descriptors, sockets
and connections are never shared between processes, as with real separate commands. Every
blocking ``acquire`` waits the lock's own way (its polling or its wake-up) with its defaults.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from benchmarks import environment
from django_isolatable.backends import load_backend_class

#: Longest any single acquisition may take before the run is declared stuck.
WAIT_LIMIT = 60


def _nothing() -> None:
    pass


class Lockable(NamedTuple):
    acquire: Callable[[], None]  # blocks until held; raises after WAIT_LIMIT seconds
    release: Callable[[], None]
    close: Callable[[], None] = _nothing  # frees its connection or descriptor


@dataclass(frozen=True)
class Candidate:
    label: str
    #: Opens the lock in the calling process (given a slug unique to the measurement).
    open: Callable[[str], Lockable]
    #: Longest pause between two attempts of a waiter (0: the waiter is woken).
    poll: float
    #: Servers and peers it needs (see ``environment.unavailable``).
    needs: tuple[str, ...] = ()


def _held(taken: object) -> None:
    if not taken:
        raise TimeoutError(f"not acquired within {WAIT_LIMIT} s")


def raw_flock(slug: str) -> Lockable:
    """Blocking ``flock`` on a descriptor opened once per process: the kernel's handoff."""
    fd = os.open(environment.work_file(f"{slug}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    return Lockable(
        lambda: fcntl.flock(fd, fcntl.LOCK_EX),
        lambda: fcntl.flock(fd, fcntl.LOCK_UN),
        lambda: os.close(fd),
    )


def raw_redis(slug: str) -> Lockable:
    """The least a Redis lock with wake-ups does: SET NX PX to take; DEL plus a push onto a
    wake-up list in one round trip to release; BLPOP on that list to wait."""
    client = environment.redis_client()
    key, wake = (f"{environment.KEY_PREFIX}{slug}:{part}" for part in ("lock", "wake"))
    token = secrets.token_hex(16)

    def acquire() -> None:
        while not client.set(key, token, nx=True, px=60_000):
            client.blpop([wake], timeout=1)

    def release() -> None:
        pipeline = client.pipeline(transaction=False)
        pipeline.delete(key, wake).lpush(wake, 1).pexpire(wake, 5000).execute()

    return Lockable(acquire, release, client.close)


def raw_advisory(slug: str) -> Lockable:
    """Blocking ``pg_advisory_lock`` on one connection per process: the server's queue."""
    import psycopg

    connection = psycopg.connect(**environment.postgres_params(), autocommit=True)
    key = environment.advisory_key(slug)

    def acquire() -> None:
        connection.execute("SELECT pg_advisory_lock(%s)", (key,))

    def release() -> None:
        connection.execute("SELECT pg_advisory_unlock(%s)", (key,))

    return Lockable(acquire, release, connection.close)


def raw_advisory_recorded(slug: str) -> Lockable:
    """``raw_advisory`` with the holder named where ``pg_stat_activity`` shows it, as a lock
    that others can inspect must: its ``application_name`` set in the locking statement and
    cleared in the unlocking one, so still one statement each way. The statements are this
    benchmark's own, run through psycopg's ``Connection.execute``."""
    import psycopg

    connection = psycopg.connect(**environment.postgres_params(), autocommit=True)
    key = environment.advisory_key(slug)

    def acquire() -> None:
        connection.execute(
            "SELECT pg_advisory_lock(%s), set_config('application_name', %s, false)",
            (key, f"bench {secrets.token_hex(16)}"),
        )

    def release() -> None:
        connection.execute(
            "SELECT pg_advisory_unlock(%s), set_config('application_name', 'bench', false)",
            (key,),
        )

    return Lockable(acquire, release, connection.close)


def app(
    strategy: str, *, max_holders: int = 1, shared: bool = False, **isolatable: str
) -> Callable[[str], Lockable]:
    """This app's ``CommandIsolation.lock()``: its own wait loop and the backend's wake-ups
    (a semaphore slot with ``max_holders`` > 1, a shared hold with ``shared``)."""

    def open_lock(slug: str) -> Lockable:
        isolation = environment.isolation(slug, strategy, max_holders=max_holders, **isolatable)
        guards: list[Any] = []
        return Lockable(
            lambda: guards.append(isolation.lock(timeout=WAIT_LIMIT, shared=shared)),
            lambda: guards.pop().release(),
        )

    return open_lock


def peer_filelock(slug: str) -> Lockable:
    from filelock import FileLock

    lock = FileLock(environment.work_file(f"{slug}.lock"), timeout=WAIT_LIMIT)
    return Lockable(lambda: lock.acquire() and None, lock.release)


def peer_portalocker(slug: str) -> Lockable:
    import portalocker

    lock = portalocker.Lock(environment.work_file(f"{slug}.lock"), timeout=WAIT_LIMIT)
    return Lockable(lambda: lock.acquire() and None, lock.release)


def peer_redis_py(slug: str) -> Lockable:
    client = environment.redis_client()
    lock = client.lock(environment.KEY_PREFIX + slug, timeout=60, blocking_timeout=WAIT_LIMIT)
    return Lockable(lambda: _held(lock.acquire()), lock.release, client.close)


def peer_python_redis_lock(slug: str) -> Lockable:
    import redis_lock

    client = environment.redis_client()
    lock = redis_lock.Lock(client, environment.KEY_PREFIX + slug, expire=60)
    return Lockable(lambda: _held(lock.acquire(timeout=WAIT_LIMIT)), lock.release, client.close)


def _app_candidate(
    label: str, strategy: str, needs: tuple[str, ...], **isolatable: Any
) -> Candidate:
    poll = load_backend_class(strategy).poll_interval
    return Candidate(label, app(strategy, **isolatable), poll, needs)


RAW_FLOCK = Candidate("raw blocking flock", raw_flock, 0)
FILE = _app_candidate("file strategy", "file", ())
FILELOCK = Candidate("filelock", peer_filelock, 0.05, ("filelock",))  # its default poll
PORTALOCKER = Candidate("portalocker", peer_portalocker, 0.25, ("portalocker",))  # default
RAW_REDIS = Candidate("raw SET NX + BLPOP wake-up", raw_redis, 0, ("redis",))
REDIS = _app_candidate("redis strategy", "redis", ("redis",))
CACHE = _app_candidate("cache strategy (Django RedisCache)", "cache", ("redis",))
REDIS_PY = Candidate("redis-py Lock", peer_redis_py, 0.1, ("redis",))  # its default sleep
PYTHON_REDIS_LOCK = Candidate(
    "python-redis-lock", peer_python_redis_lock, 0, ("redis", "python-redis-lock")
)
RAW_ADVISORY = Candidate("raw blocking pg_advisory_lock", raw_advisory, 0, ("postgres",))
RAW_ADVISORY_RECORDED = Candidate(
    "raw, holder in application_name", raw_advisory_recorded, 0, ("postgres",)
)
POSTGRES = _app_candidate("postgres strategy", "postgres", ("postgres",))
DATABASE = _app_candidate(
    "database strategy (PostgreSQL)", "database", ("postgres",), DATABASE_ALIAS="postgres"
)


def missing(candidate: Candidate) -> str | None:
    """Why ``candidate`` cannot run here, or None."""
    return next(filter(None, map(environment.unavailable, candidate.needs)), None)
