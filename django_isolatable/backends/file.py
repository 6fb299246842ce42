"""The file strategy: ``flock`` on ``<LOCK_DIR>/<safe name>.lock``, holder record inside as JSON.

The kernel lock is the truth; the record is for people (``cat`` shows who holds it). Lock files
are never unlinked on release, only blanked while still locked, so the unlink race that
filelock, portalocker and tendo shipped cannot happen here; an acquirer still checks, after
``flock``, that the path names the inode it locked, in case a person deleted the file by hand.
LOCK_DIR is checked once per backend (no link, this user's, writable by nobody else unless
sticky) and lock files are opened relative to its descriptor; each lock file must be a regular
file of this user's with one link: LOCK_DIR's descriptor and those checks are in
``backends/lockdir.py``, one lock file's name, ``flock`` attempts and record in
``backends/lockfile.py``, which lock files this process holds or keeps open in
``backends/heldfiles.py``, and semaphores' and shared holders' holder files in
``backends/fileholders.py``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from django.core.checks import CheckMessage

from django_isolatable.backends import (
    filefencing,
    filegates,
    fileholders,
    heldfiles,
    inotify,
    lockdir,
    lockfile,
)
from django_isolatable.backends.base import (
    Backend,
    BackendOptions,
    Fencing,
    Lease,
    Semaphore,
    Shared,
    Waiting,
    WakeUps,
)
from django_isolatable.backends.lockfile import file_name
from django_isolatable.backends.periods import FilePeriods
from django_isolatable.errors import LockIOError
from django_isolatable.holders import MAX_HOLDERS, LockInfo, this_pid

logger = logging.getLogger(__name__)

FIRST_PAUSE = 0.001  # seconds a waiter first sleeps between attempts; doubles to poll_interval


@dataclass
class FileLease(Lease):
    fd: int = -1
    path: str = ""
    record_size: int = 0
    #: A semaphore's or shared holder's share in its process's shared flock on the lock file.
    hold: heldfiles.SharedHold | None = None


class FileBackend(Backend, Waiting, WakeUps, Semaphore, Shared, Fencing, FilePeriods):
    """``flock`` locks in LOCK_DIR. Not expiring: the kernel drops a dead process's lock."""

    strategy: ClassVar[str] = "file"
    poll_interval: ClassVar[float] = 0.025  # a safety net: releases wake waiters through inotify

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.lock_dir = options.lock_dir
        self._dir = os.path.join(options.lock_dir, "")  # with a trailing separator
        self._directory = lockdir.LockDirectory(options.lock_dir)  # checked on first use

    def lock_path(self, name: str) -> Path:
        return Path(self._path(name))

    def _path(self, name: str) -> str:
        return self._dir + file_name(name)

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        return lockdir.check(options.lock_dir)

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        path = self._path(name)
        if not heldfiles.claim(path):
            return None
        lease = None
        try:
            lease = self._lock(name, path, info)
        finally:
            heldfiles.settle(path, None if lease is None else info)
        return lease

    def _lock(self, name: str, path: str, info: LockInfo) -> FileLease | None:
        for _ in range(5):
            entry = heldfiles.kept(path) or self._open_file(path)
            try:
                locked = lockfile.try_flock(entry.fd, path)  # held, or only looked at
            except LockIOError:
                heldfiles.close(path, entry)
                raise
            if not locked:
                if entry.stat_if_at(path) is not None:
                    return None
                # held, but a person deleted the file: lock the new one
                heldfiles.close(path, entry)
                continue
            try:
                current = entry.stat_if_at(path)
                if current is not None:
                    size = lockfile.write_record(entry.fd, path, info, current.st_size)
                    return FileLease(
                        name, info.token or "", info, fd=entry.fd, path=path, record_size=size
                    )
            except BaseException:
                heldfiles.close(path, entry)  # never leave it locked with no lease to release it
                raise
            # replaced or removed after it was opened (LOCK_DIR too, maybe)
            heldfiles.close(path, entry)
        logger.warning("Lock file %s keeps being replaced; is something deleting it?", path)
        return None  # as if held: a waiter tries again

    def _open_file(self, path: str) -> heldfiles.OpenFile:
        entry = self._open_new(path)
        heldfiles.keep(path, entry)
        return entry

    def _open_new(self, path: str) -> heldfiles.OpenFile:
        fd, opened = self._directory.open(path[len(self._dir) :], os.O_RDWR | os.O_CREAT)
        return heldfiles.OpenFile(fd, opened.st_dev, opened.st_ino)

    def acquire_slot(self, name: str, info: LockInfo, max_holders: int) -> Lease | None:
        return fileholders.take(self, name, info, max_holders, gated=False)

    def acquire_shared(self, name: str, info: LockInfo) -> Lease | None:
        return fileholders.take(self, name, info, MAX_HOLDERS, gated=True)

    def wait_for_release(self, name: str, timeout: float) -> None:
        filefencing.wait_for_release(self, name, timeout)

    def fencing_token(self, lease: Lease) -> int | None:
        return filefencing.issue(self, lease)

    def close(self) -> None:
        """Close the lock files of this LOCK_DIR that this process keeps open and holds not."""
        heldfiles.close_free(self._dir)

    def release(self, lease: Lease) -> bool:
        if not isinstance(lease, FileLease):
            return self._clear_stale(lease)
        if lease.fd < 0:
            return False
        fd, lease.fd = lease.fd, -1
        if lease.pid != this_pid():
            return False  # a forked child's copy: the child closed it at fork
        lockfile.blank(fd, lease.record_size)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as e:  # closing the descriptor below unlocks it all the same
            logger.warning("Could not unlock lock file %s on release: %s", lease.path, e)
            unlocked = False
        else:
            unlocked = True
        # Nobody waits for a holder file: a semaphore's and shared holders' waiters poll.
        touch = lease.hold is None
        ours = heldfiles.released(lease.path, lease.info, fd, unlocked=unlocked, touch=touch)
        if lease.hold is None:
            return True
        heldfiles.leave(lease.hold)
        return ours  # False: force-released meanwhile

    def _clear_stale(self, lease: Lease) -> bool:
        """Empty the record of a dead holder, if ``lease.token`` is still the one recorded
        (an empty token: if the record has none, or cannot be read)."""
        file = file_name(lease.name)
        if lease.info.mode == "exclusive" and lockfile.clear_if_stale(
            self._directory, file, lease.name, lease.token
        ):
            return True
        return fileholders.clear_stale(self, lease)

    def inspect(self, name: str) -> list[LockInfo]:
        """The plain holder's record, then the semaphore's or shared holders' (``[]`` when
        free), with ``alive`` from the kernel: held or not."""
        self._directory.recheck()
        main_file = file_name(name)
        return self._records(name, main_file, fileholders.holder_files(self, main_file))

    def _records(self, name: str, main_file: str, holder_files: list[str]) -> list[LockInfo]:
        record = self._read(name, main_file)
        found = [] if record is None else [record]
        found.extend(fileholders.records(self, name, holder_files))
        return found

    def _read(self, name: str, file: str) -> LockInfo | None:
        """The record in ``file`` of LOCK_DIR, with ``alive`` from the kernel: held or not.

        An empty file is a free lock (or one whose holder is writing its record this instant)
        and is not checked further: holders empty the file before unlocking, so a free lock is
        empty unless its holder died. A record is checked with an instant's shared lock, which
        only an acquirer racing for a dead holder's lock can see (and it retries).
        """
        path = self._dir + file
        mine = heldfiles.holder(path)
        if mine is not None or heldfiles.sharing(path):
            return mine  # reading would open and close the file, which drops locks on NFS
        try:
            fd, _ = self._directory.open(file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            record = lockfile.read_record(fd, name)
            if record is None:
                return None
            held = not lockfile.try_flock(fd, path, shared=True)
        finally:
            os.close(fd)
        # The kernel has the last word: a forked child may hold a dead parent's lock, and a
        # holder on another host over NFS cannot be judged by its PID.
        return replace(record, alive=held)

    def list(self) -> Iterator[LockInfo]:
        self._directory.recheck()
        if self._directory.fd(create=False) is None:  # checked: refused if unsafe
            return
        try:
            with os.scandir(self.lock_dir) as found:
                entries = [e.name for e in found if e.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return
        except OSError as e:
            raise lockdir.os_error(e, str(self.lock_dir), self.lock_dir) from e
        for main_file, holder_files in fileholders.group(entries).items():
            # A hashed name is read from a record: the lock file's, else a holder file's.
            names = (lockfile.name_of(self._directory, main_file, f) for f in holder_files)
            name = lockfile.name_of(self._directory, main_file) or next(filter(None, names), None)
            if name is not None:
                yield from self._records(name, main_file, holder_files)

    def force_release(self, name: str, token: str | None = None) -> bool:
        """Release ``name`` whoever holds it; with ``token`` only while that token is recorded.

        Free under flock, a record is emptied (with ``token``: only that holder's, judged
        under the flock). Held by a live process, which nobody can take the flock from, the
        file is unlinked so the next acquirer locks a new one while the old holder runs on
        (with ``token``: only if the record still carries it right before the unlink). The
        lock file of semaphore or shared holders goes with the last live holder's file.
        """
        released, left = fileholders.force_release(self, name, token)
        last = not left and (token is None or released)
        main = lockfile.force_release(self._directory, file_name(name), name, token, last=last)
        return main is True or released

    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        """Attempt, then sleep until the lock file changes (inotify: a release touches it) or
        a pause passes (1 ms, doubling to ``poll_interval``: other hosts' releases on NFS, no
        inotify here), until taken or ``timeout`` passed. Wake-ups do not shorten the pause:
        they report this host's releases, which the pause is not for."""
        deadline = time.monotonic() + timeout
        path = self._path(name)
        pause = FIRST_PAUSE
        lease = None
        gate = None
        try:
            while True:
                lease = self.acquire(name, info)
                remaining = deadline - time.monotonic()
                if lease is not None or remaining <= 0:
                    return lease
                if gate is None:  # held: new shared holds wait behind this one from now on
                    gate_path = self._dir + lockfile.gate_file(file_name(name))
                    gate = filegates.enter(gate_path, lambda path: self._open_new(path).fd)
                else:
                    filegates.lock(gate)
                file_watch, new = inotify.watch(path)
                if new:
                    continue  # attempt again with the watch in place: no release is missed
                if file_watch is None:
                    time.sleep(min(pause, remaining))
                else:
                    file_watch.wait(min(pause, remaining))
                pause = min(pause * 2, self.poll_interval)
        except BaseException:
            if lease is not None:  # an interrupt between the grant and the return
                self.release(lease)
            raise
        finally:
            if gate is not None:
                filegates.leave(gate)
