"""The interface every strategy's backend implements.

A backend makes single, non-blocking attempts. ``CommandIsolation`` owns waiting, timeouts,
stale takeover, lease renewal and logging, so a backend stays small: the store's own operations
and nothing else.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from django.core.checks import CheckMessage, Error

from django_isolatable.holders import LockInfo


@dataclass(frozen=True)
class BackendOptions:
    """What a backend is configured with: the ISOLATABLE settings plus per-lock overrides."""

    lock_dir: Path
    ttl: float
    key_prefix: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_alias: str = "default"
    database_alias: str = "default"


@dataclass
class Lease:
    """A held lock: the owner token and record, plus what the backend keeps while it is held.

    ``pid`` is the process that acquired it: a forked child inherits the object but must never
    release its parent's lock.
    """

    name: str
    token: str
    info: LockInfo
    pid: int = field(default_factory=os.getpid)


def missing_driver(strategy: str, module: str, extra: str, check_id: str) -> list[CheckMessage]:
    """The check error for a strategy whose optional driver is not installed, if it is not."""
    if importlib.util.find_spec(module) is not None:
        return []
    return [
        Error(
            f"The {strategy} strategy needs the {module} package: "
            f"pip install 'django-isolatable[{extra}]'.",
            id=check_id,
        )
    ]


class Backend:
    """One strategy's lock operations. Subclasses set ``strategy`` and implement the methods."""

    strategy: ClassVar[str]
    #: Leases expire unless renewed with ``refresh`` (redis, database, cache).
    expiring: ClassVar[bool] = False
    #: ``refresh`` is called every TTL/3 while a lock is held: it renews an expiring lease, or
    #: checks that the session holding the lock is still there (postgres).
    heartbeat: ClassVar[bool] = False
    #: Longest pause between two attempts of a waiter; ``wait`` may wake it sooner.
    poll_interval: ClassVar[float] = 0.05
    #: ``wait`` holds a place in the store's own queue or wake-up list (pg_advisory_lock,
    #: BLPOP): waiters then block for the whole ``poll_interval`` at once, where others start
    #: with short pauses and lengthen them.
    queued_wait: ClassVar[bool] = False
    #: ``wait`` takes the lock when it is free (and the next ``acquire`` of the thread claims
    #: it), returning at once: a ``lock()`` that may wait starts with ``wait`` instead of an
    #: attempt that fails under contention (postgres: ``pg_advisory_lock`` in the server's
    #: queue; redis: a take, then ``BLPOP``, in one exchange). For an ``expiring`` strategy it
    #: does so only while its isolation looked at the holder lately (``STALE_CHECK_EVERY``):
    #: otherwise the lock may be a dead holder's, which a plain attempt finds, and takes over, at
    #: once. Such a ``lock()`` makes the holder record before the wait, so the lock is handed
    #: over with less to do; the ``acquire`` after it sets ``acquired_at`` (and ``expires_at``)
    #: to when it got the lock.
    wait_takes_lock: ClassVar[bool] = False

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        """System check messages about the settings this strategy uses (none by default)."""
        return []

    def lock_path(self, name: str) -> Path | None:
        """The file that holds ``name``'s lock, for strategies that use one."""
        return None

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        """One attempt to take ``name`` for the holder described by ``info``.

        Returns the lease, or None when someone else holds it. Raises ``LockIOError`` (or a more
        specific ``IsolationError``) when the store cannot be used.
        """
        raise NotImplementedError

    def release(self, lease: Lease) -> bool:
        """Release ``lease`` if it is still ours (by owner token).

        Returns False, quietly, when it is not held by this lease any more, and for a lease a
        forked child inherited (``lease.pid`` is not this process): that drops only what the
        child inherited, never its parent's lock.
        """
        raise NotImplementedError

    def refresh(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease to ``ttl`` seconds from now (or check it is still held).

        False if it was lost: expired, taken, or its session gone. Raises ``LockIOError`` when
        the store cannot be reached (the caller retries until the lease must have expired).
        """
        return True

    def inspect(self, name: str) -> LockInfo | None:
        """The current holder of ``name``, read-only.

        None when there is no record. A backend that knows for certain whether the holder is
        alive (the kernel, a live database session) sets ``alive``, and marks a lease the store
        judges expired ``alive=False``; otherwise it leaves ``alive`` None for
        ``holders.judged`` to decide.
        """
        raise NotImplementedError

    def list(self) -> Iterable[LockInfo]:
        """Every lock record this backend can see (held or stale), as ``inspect`` returns them."""
        raise NotImplementedError

    def force_release(self, name: str) -> bool:
        """Release ``name`` whoever holds it; True if something was released."""
        raise NotImplementedError

    def wait(self, name: str, timeout: float) -> None:
        """Block for up to ``timeout`` seconds, returning early when ``name`` is probably free.

        The default just sleeps; backends with a wake-up (inotify, pub/sub, a server-side lock
        queue) return as soon as the holder lets go, which makes handoff fast.
        """
        time.sleep(timeout)

    def close(self) -> None:
        """Free the connections this backend keeps for the calling thread (never held locks)."""
