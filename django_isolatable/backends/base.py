"""The interface every strategy's backend implements.

A backend makes single, non-blocking attempts. ``CommandIsolation`` owns waiting, timeouts,
stale takeover, lease renewal and logging, so a backend stays small: the store's own operations
and nothing else.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from django.core.checks import CheckMessage, Error

from django_isolatable.errors import IsolationError
from django_isolatable.holders import LockInfo, printable, this_pid


@dataclass(frozen=True)
class BackendOptions:
    """What a backend is configured with: the ISOLATABLE settings plus per-lock overrides."""

    lock_dir: Path
    ttl: float
    key_prefix: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    cache_alias: str = "default"
    database_alias: str = "default"
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # (host, port) pairs; () = no Sentinel
    redis_sentinel_service: str | None = None
    redis_cluster: bool = False
    redis_replica_acks: int = 0


@dataclass
class Lease:
    """A held lock: the owner token and record, plus what the backend keeps while it is held.

    ``pid`` is the process that acquired it: a forked child inherits the object but must never
    release its parent's lock.
    """

    name: str
    token: str
    info: LockInfo
    pid: int = field(default_factory=this_pid)


def missing_driver(strategy: str, module: str, extra: str, check_id: str) -> list[CheckMessage]:
    """The check error for a strategy whose optional driver is not installed, or installed but
    broken (it fails to import), if it is not usable."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == module
        return [
            Error(
                f"The {strategy} strategy needs the {module} package: "
                f"pip install 'django-isolatable[{extra}]'"
                + ("." if missing else f" (it is installed but fails to import: {e})."),
                id=check_id,
            )
        ]
    return []


class Backend:
    """One strategy's lock operations: single attempts against its store, on its driver's public
    API. Subclasses set ``strategy`` and implement the methods; optional abilities are the small
    interfaces below (``Waiting``, ``Semaphore``, ``Shared``, ``Periods``), which
    ``CommandIsolation`` asks a backend for with ``isinstance``.

    A backend stores and returns the ``LockInfo`` it is given and never judges liveness
    (``holders.py`` does).
    """

    strategy: ClassVar[str]
    #: Leases expire unless renewed with ``refresh`` (redis, database, cache).
    expiring: ClassVar[bool] = False
    #: ``refresh`` is called every TTL/3 while a lock is held: it renews an expiring lease, or
    #: checks that the session holding the lock is still there (postgres).
    heartbeat: ClassVar[bool] = False
    #: Longest pause between two attempts when ``CommandIsolation`` polls (no ``Waiting``).
    poll_interval: ClassVar[float] = 0.05

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        """System check messages about the settings this strategy uses (none by default)."""
        return []

    def store(self) -> str:
        """Names the store this backend's leases live in (one renewal thread per store, so a
        stuck store never delays another's renewals). Must not expose credentials."""
        return self.strategy

    def lock_path(self, name: str) -> Path | None:
        """The file that holds ``name``'s lock, for strategies that use one."""
        return None

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        """One non-blocking attempt to take ``name`` for the holder described by ``info``.

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
        Returns or raises within ``ttl`` seconds: a store that stops answering must not keep
        the caller waiting past the lease's end.
        """
        return True

    def inspect(self, name: str) -> list[LockInfo]:
        """The current holders of ``name``, read-only: ``[]`` when there is no record, one
        record for a plain lock, one per holder for a semaphore's slots or shared holds.

        A backend that knows for certain whether a holder is alive (the kernel, a live database
        session) sets ``alive``, and marks a lease the store judges expired ``alive=False``;
        otherwise it leaves ``alive`` None for ``holders.judged`` to decide.
        """
        raise NotImplementedError

    def list(self) -> Iterable[LockInfo]:
        """Every holder record this backend can see (held or stale), as ``inspect`` returns
        them (one per holder of a semaphore or shared lock), streamed: a store with many locks
        is never read into memory at once."""
        raise NotImplementedError

    def force_release(self, name: str, token: str | None = None) -> bool:
        """Release ``name`` whoever holds it; True if something was released.

        With ``token``, only while that token holds it (or is its dead holder's record):
        judged and released in one step, so a holder that took the lock after someone looked
        at it is never touched. Without, every holder: each slot of a semaphore, each shared
        hold.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Free the connections this backend keeps for the calling thread (never held locks)."""


class Waiting(abc.ABC):
    """Ability: block in the store until the lock is taken (Symfony's ``BlockingStoreInterface``).

    A backend that has it inherits this as well as ``Backend``; without it, ``CommandIsolation``
    polls ``acquire`` with growing, jittered pauses.
    """

    @abc.abstractmethod
    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        """Block until this caller holds ``name`` (the lease) or ``timeout`` seconds (finite,
        > 0) passed (None), in one visible call: taking a free lock, waiting for its release
        and taking it then are this one call, with no round trip between the release and the
        take where the store allows it.

        Leaves nothing held when it returns None or raises, an interrupt (``KeyboardInterrupt``,
        a signal handler's exception) included: what the store granted meanwhile is released.
        """


def holder_count_mismatch(name: str, recorded: int, asked: int) -> IsolationError:
    """The error of a lock call whose ``max_holders`` differs from the one its current holders
    recorded: two users of one name disagree on how many may hold it."""
    return IsolationError(
        f"Lock {printable(name)} is held with max_holders={recorded}, but this call asks for "
        f"max_holders={asked}: every user of one lock name must pass the same max_holders "
        f"(see `manage.py locks status {printable(name)}`)."
    )


class Semaphore(abc.ABC):
    """Ability: up to N holders of one name at once (``CommandIsolation(max_holders=N)``).

    A semaphore's holders have records with ``mode="semaphore"`` and ``max_holders=N``, and
    the same guarantees as a plain lock's holder: owner-only release (``release``), dead
    holders freed (by the kernel, the session, or ``force_release(name, token)`` of a dead
    record), leases renewed with ``refresh``. ``inspect`` returns every holder. A plain
    ``acquire`` of the name fails while a semaphore holder holds it.
    """

    @abc.abstractmethod
    def acquire_slot(self, name: str, info: LockInfo, max_holders: int) -> Lease | None:
        """One non-blocking attempt to become one of at most ``max_holders`` (>= 2) holders of
        ``name`` (``info.mode == "semaphore"``, ``info.max_holders == max_holders``).

        None when all are taken. Raises ``holder_count_mismatch`` when a current holder
        recorded another count (a plain lock's holder counts as 1).
        """


class Shared(abc.ABC):
    """Ability: shared holds (``lock(shared=True)``) that coexist with each other and never with
    an exclusive hold, with writer preference.

    A plain ``acquire`` fails while a shared hold exists; ``acquire_shared`` fails while an
    exclusive hold exists, and while an exclusive locker waits (in ``acquire_waiting``, which a
    backend with this ability must have): shared holds asked for after it wait behind it.
    Records have ``mode="shared"``; ``inspect`` returns each shared holder.
    """

    @abc.abstractmethod
    def acquire_shared(self, name: str, info: LockInfo) -> Lease | None:
        """One non-blocking attempt at a shared hold of ``name``; None while it is held
        exclusively or an exclusive locker waits for it."""


class WakeUps(abc.ABC):
    """Ability: wait in the store for a holder of a name to let go, so that a waiter for a
    semaphore slot or a shared hold tries again at once instead of polling."""

    @abc.abstractmethod
    def wait_for_release(self, name: str, timeout: float) -> None:
        """Return soon after a holder of ``name`` released it (or its lease went), or after
        ``timeout`` seconds (finite, > 0). Returning early without a release is allowed; a
        release that happened just before the call may be missed (the caller tries again
        after ``timeout``), so ``CommandIsolation`` passes short slices."""


class Fencing(abc.ABC):
    """Ability: fencing tokens (``guard.fencing_token``, checked by ``fence()``)."""

    @abc.abstractmethod
    def fencing_token(self, lease: Lease) -> int | None:
        """Issue the next fencing token for ``lease.name``: strictly greater than every token
        this store issued before for that name. Issued only while ``lease`` still holds the
        lock, checked and counted in one step, so a holder that lost its lease can never get
        a token greater than its successor's; None when it does not hold it any more. Raises
        ``LockIOError`` when the store cannot be reached."""


#: Seconds a "ran in period P" record outlives its period: a run that read the store's clock
#: just before the period ended still finds the record when it looks for it just after.
PERIOD_MARGIN = 60.0


def period_ends(period_seconds: float, period_index: int) -> float:
    """When a "ran in period P" record may go: the period's end plus ``PERIOD_MARGIN``, in
    seconds since the Unix epoch on the store's clock."""
    return (period_index + 1) * period_seconds + PERIOD_MARGIN


class Periods(abc.ABC):
    """Ability: record and read "ran in period P" on the store's clock (``once_per``).

    Period ``P`` of length ``period_seconds`` is the span from ``P * period_seconds`` to
    ``(P + 1) * period_seconds`` seconds after the Unix epoch, as ``store_time`` counts them.
    ``CommandIsolation`` calls ``ran_in`` and ``record_run`` only while it holds ``name``'s
    lock, so the two never race for one name.
    """

    @abc.abstractmethod
    def store_time(self) -> float:
        """Seconds since the Unix epoch on the clock of the store that keeps the records (the
        server's, for a store on a server): every host of a fleet asks the same clock. Raises
        ``LockIOError`` when the store cannot be reached."""

    @abc.abstractmethod
    def ran_in(self, name: str, period_seconds: float, period_index: int) -> LockInfo | None:
        """The record ``record_run`` kept for this period of ``name``, or None: no successful
        run recorded. Periods of another length are other periods. Raises ``LockIOError``."""

    @abc.abstractmethod
    def record_run(
        self, name: str, period_seconds: float, period_index: int, info: LockInfo
    ) -> None:
        """Record that ``info``'s run of ``name`` used this period. The record goes by itself
        (or is cleared by a later ``record_run``) once ``period_ends`` passed, so the store
        does not fill up. Raises ``LockIOError``."""
