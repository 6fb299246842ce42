"""The exceptions django-isolatable raises.

Every error carries its data as attributes, reads as one sentence a person can act on, and
survives a pickle round trip (so it can cross a multiprocessing boundary).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django_isolatable.holders import printable

if TYPE_CHECKING:
    from django_isolatable.holders import LockInfo


class IsolationError(Exception):
    """Base class of every error django-isolatable raises."""


def describe_holder(holder: LockInfo | None) -> str:
    """``pid 4242 on web-1 since 2026-11-28 15:30:01 UTC``, or the part of it that is known."""
    if holder is None or holder.pid is None:
        return "holder unknown"
    text = f"pid {holder.pid} on {printable(holder.hostname or 'an unknown host')}"
    if holder.acquired_at is not None:
        text += f" since {holder.acquired_at:%Y-%m-%d %H:%M:%S} UTC"
    return text


class AlreadyRunning(IsolationError):
    """The lock is held by someone else and the caller chose not to wait (longer).

    ``command`` is the lock name as given, ``holder`` the holder's record when one could be read,
    ``locked_at`` when the holder took the lock.
    """

    def __init__(self, command: str, holder: LockInfo | None = None) -> None:
        self.command = command
        self.holder = holder
        self.locked_at: datetime | None = holder.acquired_at if holder is not None else None
        #: Seconds the holder had held the lock, when that was past its maximum age (MAX_AGE).
        self.overdue_age: float | None = None
        super().__init__(self._message())

    def _message(self) -> str:
        holder = self.holder
        running, who = "is already running", describe_holder(holder)
        if holder is not None and holder.mode == "semaphore":
            running = f"is already running {holder.max_holders} times at once, its limit"
            who = f"one is {who}"
        elif holder is not None and holder.mode == "shared":
            running = "is held shared"
        return (
            f"{printable(self.command)} {running} ({who}); "
            f"see `manage.py locks status {printable(self.command)}`."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.command, self.holder))


class LockTimeout(AlreadyRunning):
    """Waiting for the lock gave up after ``timeout`` seconds."""

    def __init__(self, command: str, holder: LockInfo | None = None, timeout: float = 0.0) -> None:
        self.timeout = float(timeout)
        super().__init__(command, holder)

    def _message(self) -> str:
        return (
            f"Gave up waiting for {printable(self.command)} after {self.timeout:g} s: it is still "
            f"running ({describe_holder(self.holder)}); wait longer or see "
            f"`manage.py locks status {printable(self.command)}`."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.command, self.holder, self.timeout))


class AlreadyRan(AlreadyRunning):
    """``once_per``: this period's run already happened, so this one was skipped.

    ``holder`` is the record of the run that used the period (its pid, host and start time),
    ``period_seconds`` the period's length and ``period_index`` which period it is (its start
    is ``period_index * period_seconds`` seconds after the Unix epoch, on the store's clock).
    """

    def __init__(
        self,
        command: str,
        holder: LockInfo | None = None,
        period_seconds: float = 0.0,
        period_index: int = 0,
    ) -> None:
        self.period_seconds = float(period_seconds)
        self.period_index = int(period_index)
        super().__init__(command, holder)

    @property
    def next_period_at(self) -> datetime:
        """When the next period begins (UTC, on the store's clock)."""
        start = (self.period_index + 1) * self.period_seconds
        return datetime.fromtimestamp(start, timezone.utc)

    def ran(self) -> str:
        """``pid 4242 on web-1 at 2026-11-28 15:00:01 UTC``: who ran this period, and when."""
        holder = self.holder
        if holder is None or holder.pid is None:
            return "by an unknown run"
        text = f"pid {holder.pid} on {printable(holder.hostname or 'an unknown host')}"
        if holder.acquired_at is not None:
            text += f" at {holder.acquired_at:%Y-%m-%d %H:%M:%S} UTC"
        return text

    def _message(self) -> str:
        return (
            f"{printable(self.command)} already ran in this period ({self.ran()}); the next "
            f"period begins at {self.next_period_at:%Y-%m-%d %H:%M:%S} UTC."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.command, self.holder, self.period_seconds, self.period_index))


class LockFileError(IsolationError):
    """The lock location cannot be used (for example LOCK_DIR is a file)."""


class LockPermissionError(IsolationError):
    """The lock location exists but this process may not create or open locks there."""

    def __init__(self, path: Path | str, setting: str = 'ISOLATABLE["LOCK_DIR"]') -> None:
        self.path = Path(path)
        self.setting = setting
        super().__init__(
            f"No permission to create or open lock files in {self.path}; make it writable for "
            f"this user or point settings.{setting} at a directory that is."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.setting))


class UnsafeLockLocation(LockPermissionError):
    """LOCK_DIR, or a lock file in it, could be changed by another local user: refused.

    ``path`` is the directory or file; the message says why and what to change.
    """

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(path)
        self.args = (message,)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.args[0]))


class LockIOError(IsolationError):
    """An OS or network failure while talking to the lock store."""


class LockLost(IsolationError):
    """An expiring lease was found expired or taken by someone else while we believed we held it.

    When ``fence()`` refused this holder, ``newer_fencing_token`` is the greater token a newer
    holder of the lock recorded and ``fencing_token`` this holder's.
    """

    def __init__(
        self,
        command: str,
        holder: LockInfo | None = None,
        newer_fencing_token: int | None = None,
        fencing_token: int | None = None,
    ) -> None:
        self.command = command
        self.holder = holder
        self.newer_fencing_token = newer_fencing_token
        self.fencing_token = fencing_token
        super().__init__(self._message())

    def _message(self) -> str:
        if self.newer_fencing_token is not None:
            return (
                f"The lock for {printable(self.command)} was lost: a newer holder fenced token "
                f"{self.newer_fencing_token}, so the writes of this holder (token "
                f"{self.fencing_token}) must not commit; let this error roll back its transaction."
            )
        holder = self.holder
        return (
            f"The lock for {printable(self.command)} was lost while it ran (its lease expired or "
            f"was taken{'' if holder is None else ' by ' + describe_holder(holder)}); another "
            "copy may be running now."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.command, self.holder, self.newer_fencing_token, self.fencing_token),
        )
