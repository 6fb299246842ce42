"""CommandIsolation (a named lock, configured) and LockGuard (a held lock)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from django_isolatable.backends import (
    Backend,
    BackendOptions,
    Fencing,
    Lease,
    LockStrategy,
    Semaphore,
    Shared,
    Waiting,
    WakeUps,
    load_backend_class,
    options_from_settings,
)
from django_isolatable.backends.base import holder_count_mismatch
from django_isolatable.conf import MAX_TTL, is_valid_max_age, is_valid_ttl, isolatable_settings
from django_isolatable.errors import (
    AlreadyRan,
    AlreadyRunning,
    IsolationError,
    LockLost,
    LockTimeout,
)
from django_isolatable.holders import (
    MAX_HOLDERS,
    LockInfo,
    judged,
    new_record,
    replace_token,
    utcnow,
)
from django_isolatable.once import Period, check_once_per, open_period
from django_isolatable.renewal import Renewal, renewer
from django_isolatable.signals import (
    lock_acquired,
    lock_lost,
    lock_overdue,
    lock_released,
    lock_skipped,
    lock_taken_over,
)
from django_isolatable.waiting import wait_for

logger = logging.getLogger(__name__)


class _Default:
    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"<settings {self.key}>"


SETTINGS_TIMEOUT: Any = _Default("TIMEOUT")
SETTINGS_MAX_AGE: Any = _Default("MAX_AGE")
#: Seconds between two looks of a waiter at whether an expiring lock's holder died.
STALE_CHECK_EVERY = 0.1
#: Longest single wait in a ``Waiting`` backend's store between two looks at progress (and,
#: for expiring strategies, at whether the holder died).
WAITING_SLICE = 1.0
WAITING_SLICE_EXPIRING = 0.25
#: The longest wait of ``alock()`` in the store between two looks at whether it was cancelled:
#: how long a cancelled wait's thread may go on before it gives up (and frees what it got).
ASYNC_SLICE = 0.1
MAX_LABEL = 200


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if (type(value) is int or type(value) is float) and value >= 0:  # the common case, fast
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"timeout must be None (wait forever) or seconds >= 0, not {value!r}.")
    return float(value)


def _check_label(label: object) -> str | None:
    if label is None:
        return None
    if not isinstance(label, str):
        raise ValueError(f"A lock label must be a str or None, not {type(label).__name__}.")
    if len(label) > MAX_LABEL or "\0" in label:
        raise ValueError(
            f"A lock label must be at most {MAX_LABEL} characters without NUL: {label[:40]!r}..."
        )
    return label


def _extra(name: str, strategy: str, holder: LockInfo | None = None) -> dict[str, Any]:
    """The structured fields of every log record about a lock."""
    return {
        "lock_name": name,
        "lock_strategy": strategy,
        "holder_pid": None if holder is None else holder.pid,
    }


def _check_max_holders(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_HOLDERS:
        raise ValueError(
            f"max_holders must be a whole number from 1 to {MAX_HOLDERS}, not {value!r}."
        )
    return value


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise ValueError(f"A lock name must be a str, not {type(name).__name__} ({name!r}).")
    if not name:
        raise ValueError("A lock name must not be empty.")
    if "\0" in name:
        raise ValueError(f"A lock name must not contain NUL characters: {name!r}.")
    return name


class CommandIsolation:
    """A named lock: at most one holder at a time, in this process, on this host or everywhere.

    ``strategy`` is a ``LockStrategy``, its value, or the dotted path of a ``Backend`` class
    (default: ``settings.ISOLATABLE["STRATEGY"]``). ``timeout`` is the default wait of ``lock()``
    (default ``TIMEOUT``); ``ttl`` the lease length of expiring strategies (default ``TTL``);
    ``label`` a short text (at most 200 characters) kept in the holder record and shown by
    ``locks status``; ``max_age`` the seconds after which a holder is overdue (default
    ``MAX_AGE``): a lock call that gives up on an overdue holder logs an error and sends
    ``lock_overdue``. With ``once_per`` (seconds), at most one successful run per period
    (see ``docs/once-per.md``): a lock call that finds this period's run done releases and
    raises ``AlreadyRan``; a guard's ``with`` block left without an exception records the run.
    With ``max_holders=N``, a semaphore: up to N holders at once (1, the default, is the plain
    lock); every user of one name must pass the same N.
    Raises ``ValueError`` for an empty name or one containing NUL, or a bad ``once_per`` or
    ``max_holders``.
    """

    def __init__(
        self,
        name: str,
        *,
        strategy: LockStrategy | str | None = None,
        lock_dir: str | os.PathLike[str] | None = None,
        timeout: float | None = SETTINGS_TIMEOUT,
        ttl: float | None = None,
        label: str | None = None,
        max_age: float | None = SETTINGS_MAX_AGE,
        once_per: float | None = None,
        max_holders: int = 1,
    ) -> None:
        self.name = _check_name(name)
        self.once_per = check_once_per(once_per)
        self.max_holders = _check_max_holders(max_holders)
        if self.max_holders > 1 and self.once_per is not None:
            raise ValueError(
                "once_per cannot be combined with max_holders > 1: one run per period."
            )
        self.label = _check_label(label)
        if max_age is not SETTINGS_MAX_AGE and not is_valid_max_age(max_age):
            raise ValueError(f"max_age must be None or a number of seconds > 0, not {max_age!r}.")
        self._max_age = max_age
        self._strategy = strategy
        self._lock_dir = None if lock_dir is None else Path(lock_dir)
        self._timeout = timeout if timeout is SETTINGS_TIMEOUT else _check_timeout(timeout)
        if ttl is not None and not is_valid_ttl(ttl):
            raise ValueError(
                f"ttl must be a number of seconds > 0 and at most {MAX_TTL} (a day), not {ttl!r}."
            )
        self._ttl = ttl
        self._next_stale_check = 0.0
        self._backend: Backend | None = None
        self._backend_generation = -1

    def __repr__(self) -> str:
        holders = "" if self.max_holders == 1 else f" max_holders={self.max_holders}"
        return f"<CommandIsolation {self.name!r} strategy={self.strategy!r}{holders}>"

    def _copy(self, **changes: Any) -> CommandIsolation:
        kwargs: dict[str, Any] = {
            "strategy": self._strategy,
            "lock_dir": self._lock_dir,
            "timeout": self._timeout,
            "ttl": self._ttl,
            "label": self.label,
            "max_age": self._max_age,
            "once_per": self.once_per,
            "max_holders": self.max_holders,
        }
        kwargs.update(changes)
        return CommandIsolation(self.name, **kwargs)

    def with_strategy(self, strategy: LockStrategy | str) -> CommandIsolation:
        """A copy that uses ``strategy``."""
        return self._copy(strategy=strategy)

    def with_lock_dir(self, lock_dir: str | os.PathLike[str]) -> CommandIsolation:
        """A copy whose file locks live in ``lock_dir``."""
        return self._copy(lock_dir=lock_dir)

    def with_timeout(self, timeout: float | None) -> CommandIsolation:
        """A copy whose ``lock()`` waits ``timeout`` seconds by default (None: forever)."""
        return self._copy(timeout=timeout)

    @property
    def strategy(self) -> str:
        value = self._strategy if self._strategy is not None else isolatable_settings.STRATEGY
        return str(value)

    @property
    def timeout(self) -> float | None:
        if self._timeout is SETTINGS_TIMEOUT:
            return isolatable_settings.TIMEOUT
        return self._timeout

    @property
    def max_age(self) -> float | None:
        if self._max_age is SETTINGS_MAX_AGE:
            return isolatable_settings.MAX_AGE
        return self._max_age

    @property
    def ttl(self) -> float:
        return self._ttl if self._ttl is not None else isolatable_settings.TTL

    def backend_options(self) -> BackendOptions:
        """The settings this lock's backend gets, with this object's overrides applied."""
        return options_from_settings(lock_dir=self._lock_dir, ttl=self.ttl)

    @property
    def backend(self) -> Backend:
        """This lock's backend (created on first use, and again after ``ISOLATABLE`` changed,
        as in tests; raises ``ImproperlyConfigured``). A held lock keeps the backend that took
        it."""
        generation = isolatable_settings.generation
        if self._backend is None or self._backend_generation != generation:
            self._backend = load_backend_class(self.strategy)(self.backend_options())
            self._backend_generation = generation
        return self._backend

    def lock(
        self,
        timeout: float | None = SETTINGS_TIMEOUT,
        *,
        shared: bool = False,
        progress: Callable[[float, LockInfo | None], None] | None = None,
    ) -> LockGuard:
        """Take the lock and return its guard.

        ``timeout`` None waits forever, 0 raises ``AlreadyRunning`` at once if the lock is held,
        ``t > 0`` raises ``LockTimeout`` after about ``t`` seconds. ``progress(waited, holder)``
        is called about once a second while waiting. With ``once_per``, raises ``AlreadyRan``
        (the lock released) when this period's run happened already. With ``shared``, a
        shared hold: it coexists with other shared holds, never with an exclusive one, and
        waits behind an exclusive locker that waits already. Raises ``LockIOError``,
        ``LockPermissionError`` or ``LockFileError`` when the lock store cannot be used, and
        ``IsolationError`` when the strategy cannot hold the lock this way.
        """
        return self._lock(self._wait(timeout), progress, self.label, shared=self._shared(shared))

    def _shared(self, shared: object) -> bool:
        if not isinstance(shared, bool):
            raise ValueError(f"shared must be True or False, not {shared!r}.")
        if shared and self.max_holders > 1:
            raise ValueError(
                f"shared=True cannot be combined with max_holders={self.max_holders}: a "
                "shared lock allows any number of shared holders already."
            )
        if shared and self.once_per is not None:
            raise ValueError("shared=True cannot be combined with once_per: one run per period.")
        return shared

    def _mode(self, backend: Backend, shared: bool) -> str:
        """The kind of hold a lock call asks for, refused when ``backend`` cannot offer it."""
        if shared:
            if not isinstance(backend, Shared):
                raise IsolationError(
                    f"The {backend.strategy} strategy cannot hold lock "
                    f"{self.name!r} shared (see docs/{backend.strategy}-strategy.md); use "
                    "an exclusive lock, or a strategy with shared locks (file, redis, "
                    "postgres, memory)."
                )
            return "shared"
        if self.max_holders > 1:
            if not isinstance(backend, Semaphore):
                raise IsolationError(
                    f"The {backend.strategy} strategy cannot hold lock {self.name!r} with "
                    f"max_holders={self.max_holders}."
                )
            return "semaphore"
        return "exclusive"

    def _wait(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is SETTINGS_TIMEOUT else _check_timeout(timeout)

    def _lock(
        self,
        wait: float | None,
        progress: Callable[[float, LockInfo | None], None] | None,
        label: str | None,
        stop: threading.Event | None = None,
        *,
        shared: bool = False,
    ) -> LockGuard:
        """``lock()`` with the wait checked, for a holder labelled ``label``; a set ``stop``
        ends the wait within a slice (``alock()`` cancelled)."""
        started = time.monotonic()
        backend = self.backend
        mode = self._mode(backend, shared)
        ttl = self.ttl if backend.expiring else None  # read once per lock
        # An exclusive locker waits in the store where it can (where it also holds off new
        # shared holds: writer preference); a semaphore slot or a shared hold is tried again
        # when the store tells of a release, or polled for.
        blocking = isinstance(backend, Waiting if mode == "exclusive" else WakeUps)
        # A lock() that may wait in the store starts with that wait, which takes a free lock
        # itself: under contention a plain attempt first would cost a round trip that fails.
        # Not for an expiring lock this isolation has not looked at lately: it may be a dead
        # holder's, which a plain attempt finds, and takes over, at once.
        wait_first = (
            wait != 0
            and blocking
            and mode == "exclusive"
            and not (backend.expiring and time.monotonic() >= self._next_stale_check)
        )
        lease = None if wait_first else self._attempt(backend, ttl, label, mode=mode)
        if lease is None and wait != 0:
            report = None if progress is None else lambda waited: progress(waited, self.holder())
            interval = (
                (
                    WAITING_SLICE_EXPIRING
                    if backend.expiring or mode != "exclusive"
                    else WAITING_SLICE
                )
                if blocking
                else backend.poll_interval
            )
            if stop is not None:
                # Each wait its own slice: waiters that started together (8 alock() calls
                # at once) would otherwise all wake at once, and hold up the event loop's
                # thread together, as they all want the GIL at the same moment.
                interval = min(interval, ASYNC_SLICE * random.uniform(0.5, 1.0))
            lease = wait_for(
                lambda seconds: self._attempt(backend, ttl, label, seconds, mode=mode),
                wait,
                blocking=blocking,
                interval=interval,
                progress=report,
                stop=None if stop is None else stop.is_set,
            )
        if lease is None:
            if stop is not None and stop.is_set():
                raise asyncio.CancelledError  # nobody awaits it: not a skip
            raise self._gave_up(backend, wait)
        guard = LockGuard(self, lease, ttl, backend)
        waited = time.monotonic() - started
        logger.info(
            "Acquired lock %s (%s)",
            self.name,
            backend.strategy,
            extra=_extra(self.name, backend.strategy, lease.info),
        )
        lock_acquired.send_robust(sender=self, name=self.name, guard=guard, waited=waited)
        if self.once_per is not None:
            self._open_period(guard, backend, self.once_per)
        return guard

    def _gave_up(self, backend: Backend, wait: float | None) -> AlreadyRunning:
        """The error of a lock call that did not get the lock; ``lock_skipped`` is sent.
        Raises ``IsolationError`` instead when the holders recorded another ``max_holders``."""
        holders = self.holders()
        for found in holders:
            if found.mode != "shared" and found.max_holders != self.max_holders:
                raise holder_count_mismatch(self.name, found.max_holders, self.max_holders)
        holder = _one_of(holders)
        error = (
            AlreadyRunning(self.name, holder)
            if wait == 0
            else LockTimeout(self.name, holder, wait or 0.0)
        )
        logger.info("Not acquired: %s", error, extra=_extra(self.name, backend.strategy, holder))
        lock_skipped.send_robust(sender=self, name=self.name, holder=holder)
        max_age = self.max_age
        if max_age is not None and holder is not None and holder.acquired_at is not None:
            age = (utcnow() - holder.acquired_at).total_seconds()
            if age > max_age and holder.alive is not False:
                error.overdue_age = age
                logger.error(
                    "Lock %s has been held for %.0f s, longer than its maximum age of %g s: "
                    "its holder (pid %s on %s) may be hung",
                    self.name,
                    age,
                    max_age,
                    holder.pid,
                    holder.hostname,
                    extra=_extra(self.name, backend.strategy, holder),
                )
                lock_overdue.send_robust(sender=self, name=self.name, holder=holder, age=age)
        return error

    def _attempt(
        self,
        backend: Backend,
        ttl: float | None,
        label: str | None,
        seconds: float = 0.0,
        *,
        mode: str = "exclusive",
    ) -> Lease | None:
        """One attempt, or (``seconds`` > 0, a ``Waiting`` backend) one wait of up to
        ``seconds`` in the store; then, for an expiring strategy, a look at whether a holder
        died, taking its place if one did."""
        lease = self._take(backend, ttl, label, seconds, mode)
        if lease is None and backend.expiring and self._stale_check_due():
            taken_over = release_stale(backend, self.name)
            for previous in taken_over:
                logger.warning(
                    "Took over lock %s from a dead holder (pid %s on %s)",
                    self.name,
                    previous.pid,
                    previous.hostname,
                    extra=_extra(self.name, backend.strategy, previous),
                )
                lock_taken_over.send_robust(sender=self, name=self.name, previous=previous)
            if taken_over:
                lease = self._take(backend, ttl, label, 0.0, mode)
        logger.debug("Attempt to lock %s: %s", self.name, "taken" if lease else "held")
        return lease

    def _take(
        self, backend: Backend, ttl: float | None, label: str | None, seconds: float, mode: str
    ) -> Lease | None:
        record = new_record(
            self.name,
            backend.strategy,
            ttl=ttl,
            label=label,
            mode=mode,
            max_holders=self.max_holders,
        )
        if mode != "exclusive":
            lease = self._take_one(backend, record, mode)
            if lease is None and seconds > 0 and isinstance(backend, WakeUps):
                backend.wait_for_release(self.name, seconds)
                lease = self._take_one(backend, record, mode)
            return lease
        if seconds > 0 and isinstance(backend, Waiting):
            return backend.acquire_waiting(self.name, record, seconds)
        return backend.acquire(self.name, record)

    def _stale_check_due(self) -> bool:
        """At most every STALE_CHECK_EVERY seconds: a waiter that lost a race to a live holder
        need not ask the store and psutil about that holder again at once."""
        now = time.monotonic()
        if now < self._next_stale_check:
            return False
        self._next_stale_check = now + STALE_CHECK_EVERY
        return True

    def _take_one(self, backend: Backend, record: LockInfo, mode: str) -> Lease | None:
        """One attempt at a semaphore slot or a shared hold."""
        if mode == "semaphore":
            assert isinstance(backend, Semaphore)
            return backend.acquire_slot(self.name, record, self.max_holders)
        assert isinstance(backend, Shared)
        return backend.acquire_shared(self.name, record)

    def lock_with_timeout(self, seconds: float) -> LockGuard:
        """``lock(timeout=seconds)``."""
        return self.lock(timeout=seconds)

    def try_lock(self, *, shared: bool = False) -> LockGuard:
        """``lock(timeout=0)``: the guard, or ``AlreadyRunning`` at once."""
        return self.lock(timeout=0, shared=shared)

    def alock(
        self, timeout: float | None = SETTINGS_TIMEOUT, *, shared: bool = False
    ) -> AsyncLocking:
        """``lock()`` for async code: ``async with iso.alock() as guard:`` or
        ``guard = await iso.alock()`` (then ``await guard.arelease()``).

        The event loop is never blocked: the store is waited on in a worker thread. Cancelling
        the wait (``task.cancel()``, ``asyncio.timeout``) raises ``CancelledError`` at once and
        leaves nothing held; the worker gives up within ``ASYNC_SLICE`` seconds.
        """
        return self._alock(self._wait(timeout), self.label, self._shared(shared))

    def _alock(self, wait: float | None, label: str | None, shared: bool = False) -> AsyncLocking:
        return AsyncLocking(self, wait, label, shared)

    def atry_lock(self, *, shared: bool = False) -> AsyncLocking:
        """``alock(timeout=0)``."""
        return self.alock(timeout=0, shared=shared)

    def holders(self) -> list[LockInfo]:
        """Every current holder (a semaphore's, a shared lock's), and dead holders' leftover
        records (``alive=False``); ``[]`` when there is none."""
        return [judged(info) for info in self.backend.inspect(self.name)]

    def holder(self) -> LockInfo | None:
        """The current holder (one of them, for a semaphore or a shared lock), a dead holder's
        leftover record (``alive=False``), or None."""
        return _one_of(self.holders())

    def is_locked(self) -> bool:
        """True if anyone holds the lock, this process included."""
        return any(holder.alive is not False for holder in self.holders())

    def lock_path(self) -> Path | None:
        """The lock file (file strategy), else None."""
        return self.backend.lock_path(self.name)

    def release_all(self) -> bool:
        """Release the lock whoever holds it; True if something was released.

        For the file strategy a live holder cannot be stopped: its lock file is removed so the
        next run can start, while the old holder runs on. This is what ``--force`` means.
        """
        released = self.backend.force_release(self.name)
        if released:
            logger.warning("Force-released lock %s (%s)", self.name, self.strategy)
        return released

    def release_if_stale(self) -> bool:
        """Release every holder of the lock that is proven dead (or whose lease expired); True
        if any was. What ``manage.py locks release NAME`` does without ``--force`` (see
        ``release_stale``)."""
        return bool(release_stale(self.backend, self.name))

    def _open_period(self, guard: LockGuard, backend: Backend, once_per: float) -> None:
        """``once_per``: give the just-taken ``guard`` its period, or release it and raise
        ``AlreadyRan`` (``lock_skipped`` sent) if the period's run happened already."""
        try:
            guard._period = open_period(backend, self.name, once_per)
        except AlreadyRan as e:
            guard.release()
            logger.info("Not run: %s", e, extra=_extra(self.name, backend.strategy, e.holder))
            lock_skipped.send_robust(sender=self, name=self.name, holder=e.holder)
            raise
        except BaseException:
            guard.release()
            raise


def _one_of(holders: list[LockInfo]) -> LockInfo | None:
    """The holder to name for a lock: a live one if any, else a leftover record, else None."""
    for holder in holders:
        if holder.alive is not False:
            return holder
    return holders[0] if holders else None


def release_stale(backend: Backend, name: str) -> list[LockInfo]:
    """Release each holder of ``name`` in ``backend`` that is proven dead (or whose lease
    expired): every slot of a semaphore, every shared hold. The released holders' records.

    Goes by each dead holder's token, so a live holder that took its place in the meantime is
    never touched. A record without a token is released only where the backend itself judged
    it dead (the kernel: nobody holds the file lock), which it checks again as it releases.
    """
    released = []
    for found in backend.inspect(name):
        holder = judged(found)
        if holder.alive is not False or (holder.token is None and found.alive is not False):
            continue
        if not backend.release(Lease(name, holder.token or "", holder)):
            continue
        logger.info(
            "Released the stale lock %s of dead pid %s on %s",
            name,
            holder.pid,
            holder.hostname,
            extra=_extra(name, backend.strategy, holder),
        )
        released.append(holder)
    return released


class LockGuard:
    """A held lock. Release it with ``release()`` (idempotent) or by leaving the ``with`` block.

    Releasing never touches a lock that someone else holds now: it goes by owner token.
    A guard that is garbage collected while held releases its lock; a forked child's copy never
    releases its parent's lock.
    """

    #: ``once_per``: the period this guard's run belongs to, until the run is recorded.
    _period: Period | None = None
    _fencing_token: int | None = None

    def __init__(
        self,
        isolation: CommandIsolation,
        lease: Lease,
        ttl: float | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.isolation = isolation
        self._taken = time.monotonic()
        self._lease = lease
        self._backend = backend or isolation.backend  # the one that took the lease
        self._state = threading.Lock()
        self._released = False
        self._lost = False
        self._renewal: Renewal | None = None
        if self._backend.heartbeat:
            if ttl is None and self._backend.expiring:  # the lease's, if the caller read it
                ttl = isolation.ttl
            # The renewal holds the guard weakly, so a dropped guard is still collected.
            self._renewal = renewer.start(self._backend, lease, ttl, _on_lost(weakref.ref(self)))

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self._lost else "held"
        return f"<LockGuard {self.isolation.name!r} {state}>"

    @property
    def info(self) -> LockInfo:
        """The record this guard's holder wrote when it took the lock, with its fencing token
        once it was issued."""
        return replace_token(self._lease.info, self._fencing_token)

    @property
    def fencing_token(self) -> int:
        """This holder's fencing token: strictly greater than every token the store issued
        before for this lock's name, for ``fence()`` (see docs/fencing.md). Issued when first
        read, and only while the lock is still held: raises ``LockLost`` (the guard marked
        lost) if it is not, ``IsolationError`` for a strategy without fencing tokens or a
        guard released before its token was read, ``LockIOError`` when the store fails."""
        token = self._fencing_token
        if token is not None:
            return token
        name = self.isolation.name
        if not isinstance(self._backend, Fencing):
            raise IsolationError(
                f"The {self._backend.strategy} strategy issues no fencing tokens, so lock "
                f"{name!r} has none (see docs/fencing.md)."
            )
        if self._released:
            raise IsolationError(f"Lock {name!r} was released before its fencing token was read.")
        token = self._backend.fencing_token(self._lease)
        if token is None:
            self._mark_lost("before its fencing token was issued")
            raise LockLost(name, self.isolation.holder())
        self._fencing_token = token
        return token

    @property
    def lost(self) -> bool:
        """True once the lease was found expired or taken (or the session holding it gone),
        while held or when releasing it found it no longer held."""
        return self._lost

    def _mark_lost(self, when: str = "while it was held") -> None:
        with self._state:
            if self._lost:
                return
            self._lost = True
        logger.warning(
            "Lost lock %s: its lease expired or was taken %s",
            self.isolation.name,
            when,
            extra=self._extra(),
        )
        # Robustly: a receiver's error is logged (by Django) and never stops the renewals.
        lock_lost.send_robust(sender=self.isolation, name=self.isolation.name, guard=self)

    def _extra(self) -> dict[str, Any]:
        return _extra(self.isolation.name, self._backend.strategy, self._lease.info)

    def check(self) -> None:
        """Raise ``LockLost`` if the lease was lost."""
        if self._lost:
            raise LockLost(self.isolation.name, self.isolation.holder())

    def release(self) -> None:
        """Release the lock if this guard still holds it; calling it again does nothing.

        A lock found no longer held marks the guard ``lost`` (and sends ``lock_lost``): someone
        else may have run meanwhile.
        """
        with self._state:
            if self._released:
                return
            self._released = True
        if self._renewal is not None:
            self._renewal.cancel()
        try:
            released = self._backend.release(self._lease)
        except IsolationError as e:  # never hide the result of the work the lock protected
            logger.warning(
                "Could not release lock %s: %s", self.isolation.name, e, extra=self._extra()
            )
            return
        if released:
            held_for = time.monotonic() - self._taken
            logger.info("Released lock %s", self.isolation.name, extra=self._extra())
            lock_released.send_robust(
                sender=self.isolation, name=self.isolation.name, guard=self, held_for=held_for
            )
        elif self._lease.pid == os.getpid() and not self._lost:
            self._mark_lost("before it was released")

    async def arelease(self) -> None:
        """``release()`` for async code: the store is called from a worker thread. Once begun
        it completes, even if the awaiting task is cancelled."""
        if self._released:
            return
        await asyncio.shield(_in_worker(self.release))

    def __enter__(self) -> LockGuard:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None and self._period is not None and not self._lost:
            self.record_run()
        self.release()

    async def __aenter__(self) -> LockGuard:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None and self._period is not None and not self._lost:
            await asyncio.shield(_in_worker(self.record_run))
        await self.arelease()

    def __del__(self) -> None:
        if getattr(self, "_released", True):
            return
        # At interpreter shutdown this may fail; the kernel or the TTL frees the rest.
        with contextlib.suppress(Exception):
            if _on_event_loop():  # a guard of async code: no store call on the loop's thread
                _submit(self.release)
            else:
                self.release()

    def record_run(self) -> None:
        """``once_per``: record that this period's run succeeded, so later runs in the period
        are skipped; what leaving the guard's ``with`` block without an exception does (unless
        the lock was found lost by then). Call it before ``release()`` when not using ``with``.
        Once only; nothing without ``once_per``. A store that fails is logged as an error (the
        work is done; another run in this period may follow), never raised."""
        period, self._period = self._period, None
        if period is None or self._released:
            return
        try:
            period.record(self._lease.info)
        except IsolationError as e:
            logger.error(
                "Ran %s, but could not record its run in this period (another run in it may "
                "follow): %s",
                self.isolation.name,
                e,
                extra=self._extra(),
            )


def _on_lost(guard: weakref.ref[LockGuard]) -> Callable[[], None]:
    def report() -> None:
        held = guard()
        if held is not None and not held._released:
            held._mark_lost()

    return report


class _Stop(threading.Event):
    """Set when an ``alock()`` wait is abandoned; it reads as set once the wait's event loop is
    closed, too: a task left pending on a closed loop can never take the lock, and its worker
    must not go on waiting (the interpreter joins the workers at exit)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop

    def is_set(self) -> bool:
        return super().is_set() or self._loop.is_closed()


class AsyncLocking(Coroutine[Any, Any, LockGuard]):
    """What ``alock()`` returns: await it for the guard, run it as a task
    (``asyncio.create_task``), or use it with ``async with``."""

    def __init__(
        self,
        isolation: CommandIsolation,
        wait: float | None,
        label: str | None,
        shared: bool = False,
    ):
        self._isolation = isolation
        self._wait = wait
        self._label = label
        self._shared = shared
        self._guard: LockGuard | None = None
        self._taking: Coroutine[Any, Any, LockGuard] | None = None

    def _coroutine(self) -> Coroutine[Any, Any, LockGuard]:
        if self._taking is None:  # made on first use: an AsyncLocking never awaited is fine
            self._taking = self._take()
        return self._taking

    def __await__(self) -> Generator[Any, None, LockGuard]:
        return self._coroutine().__await__()

    def send(self, value: Any) -> Any:
        return self._coroutine().send(value)

    def throw(self, typ: Any, val: Any = None, tb: TracebackType | None = None, /) -> Any:
        if val is None and tb is None:
            return self._coroutine().throw(typ)
        return self._coroutine().throw(typ, val, tb)

    def close(self) -> None:
        if self._taking is not None:
            self._taking.close()

    async def __aenter__(self) -> LockGuard:
        self._guard = await self._take()
        return self._guard

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._guard is not None:
            await self._guard.__aexit__(exc_type, exc, traceback)

    def _take_in_worker(self, stop: threading.Event) -> LockGuard:
        return self._isolation._lock(self._wait, None, self._label, stop, shared=self._shared)

    async def _take(self) -> LockGuard:
        stop = _Stop(asyncio.get_running_loop())
        future = _submit(self._take_in_worker, stop)
        try:
            return await asyncio.wrap_future(future)
        except BaseException:
            # Cancelled, or closed (``close()``): nobody takes the lock. The worker stops
            # within a slice, and whatever it took by then is released at once. (The lock
            # call's own error arrives here too, from a worker that is done already.)
            stop.set()
            future.add_done_callback(_release_taken)
            raise


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _release_taken(future: Future[LockGuard]) -> None:
    """Release what a cancelled ``alock()``'s worker took, from a worker: this may run on the
    event loop's thread (the worker had finished), where no store may be called."""
    if not future.cancelled() and future.exception() is None:
        _submit(future.result().release)


_workers: ThreadPoolExecutor | None = None
_workers_lock = threading.Lock()


def _submit(function: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``function(*args)`` in a worker thread, in the caller's context (contextvars).

    The threads are this module's own, not the loop's default executor: each waiting
    ``alock()`` keeps one busy for its wait, and the default has a few threads per CPU only.
    """
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = ThreadPoolExecutor(max_workers=256, thread_name_prefix="isolatable")
        workers = _workers
    return workers.submit(contextvars.copy_context().run, function, *args)


def _in_worker(function: Callable[[], Any]) -> asyncio.Future[Any]:
    return asyncio.wrap_future(_submit(function))


def _forget_workers() -> None:
    global _workers
    _workers = None  # a forked child has none of its parent's threads


os.register_at_fork(after_in_child=_forget_workers)
