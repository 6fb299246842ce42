"""The file strategy's per-process tables: which lock files this process holds (or is taking),
which it holds shared for its semaphore and shared holders, and which lock files it keeps open
between acquisitions. Gates, at which exclusive lockers wait, are in ``backends/filegates.py``.

Threads exclude each other here before the kernel is asked, which also keeps NFS correct, where
flock is emulated with per-process POSIX locks. A lock file stays open after its lock is
released, so taking it again locks and unlocks the same descriptor in place; only the thread
that claimed a path uses its descriptor. The tables change only under one lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from django_isolatable.backends import filegates
from django_isolatable.holders import LockInfo

#: Free lock files kept open past this many are closed.
MAX_OPEN_FILES = 64


class OpenFile(NamedTuple):
    """A lock file's descriptor, and the device and inode it was opened as."""

    fd: int
    dev: int
    ino: int

    def stat_if_at(self, path: str) -> os.stat_result | None:
        """The file at ``path``, if it is still this one (not deleted or replaced), else None."""
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        return current if current.st_ino == self.ino and current.st_dev == self.dev else None


@dataclass(eq=False)
class SharedHold:
    """This process's shared flock on a lock file, kept while ``count`` of its semaphore or
    shared holders hold the lock: one flock per process, as NFS has only per-process locks."""

    path: str
    entry: OpenFile
    count: int = 1


# Holders of the locks this process holds, by path; None while a thread is taking it.
_held: dict[str, LockInfo | None] = {}
_shared: dict[str, SharedHold] = {}
_open_files: dict[str, OpenFile] = {}
#: How many kept files make ``_keep`` close the free ones.
_sweep_at = MAX_OPEN_FILES
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The child shares the parent's open file descriptions, hence its flocks: it must never
    # lock through them. Closing its copies leaves the parent's locks alone.
    global _lock, _sweep_at
    _lock = threading.Lock()  # another thread may have held it at fork
    _sweep_at = MAX_OPEN_FILES
    _held.clear()
    shared = {hold.entry.fd for hold in _shared.values()}
    for fd in shared | {entry.fd for entry in _open_files.values()}:
        with contextlib.suppress(OSError):
            os.close(fd)
    _open_files.clear()
    _shared.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def claim(path: str) -> bool:
    """Claim ``path`` for the calling thread's attempt; False if this process holds it or another
    thread is taking it. End the claim with ``settle``."""
    with _lock:
        if path in _held or path in _shared:
            return False
        _held[path] = None
        return True


def settle(path: str, info: LockInfo | None) -> None:
    """End a claim: ``info``'s lock now holds ``path``, or (None) the attempt did not take it."""
    with _lock:
        if info is None:
            _held.pop(path, None)
        else:
            _held[path] = info


def claimed(path: str) -> bool:
    """Whether this process holds ``path`` or a thread of it is taking it."""
    with _lock:
        return path in _held


def holder(path: str) -> LockInfo | None:
    """The record of this process's lock on ``path``; None if it holds none (yet)."""
    with _lock:
        return _held.get(path)


def rerecord(path: str, old: LockInfo, new: LockInfo) -> None:
    """``new`` is the record of the lock on ``path`` held with the record ``old`` now."""
    with _lock:
        if _held.get(path) is old:
            _held[path] = new


def kept(path: str) -> OpenFile | None:
    """The lock file kept open for ``path``, if any."""
    return _open_files.get(path)


def keep(path: str, entry: OpenFile) -> None:
    """Keep ``entry`` open for ``path``; past ``MAX_OPEN_FILES``, close the free ones first."""
    with _lock:
        _keep(path, entry)


def _keep(path: str, entry: OpenFile) -> None:
    global _sweep_at
    if len(_open_files) >= _sweep_at:
        for other in [p for p in _open_files if _free(p)]:
            os.close(_open_files.pop(other).fd)
        # The held ones stay open: sweep again once as many more are kept, not on every keep
        # (a process holding thousands of locks would scan them all on each acquire).
        _sweep_at = max(MAX_OPEN_FILES, 2 * len(_open_files))
    _open_files[path] = entry


def _free(path: str) -> bool:
    return path not in _held and path not in _shared


def close(path: str, entry: OpenFile) -> None:
    """Close a lock file's descriptor (unlocking it) and stop keeping it."""
    with _lock:
        if _open_files.get(path) is entry:
            del _open_files[path]
    os.close(entry.fd)


def close_free(prefix: str) -> None:
    """Close the kept lock files whose paths start with ``prefix`` and that no lock is on."""
    with _lock:
        free = [p for p in _open_files if p.startswith(prefix) and _free(p)]
        for path in free:
            os.close(_open_files.pop(path).fd)


def sharing(path: str) -> bool:
    """Whether this process holds ``path`` shared (a semaphore's or shared holders' lock)."""
    with _lock:
        return path in _shared


def released(path: str, info: LockInfo, fd: int, *, unlocked: bool, touch: bool = True) -> bool:
    """End ``info``'s lock on ``path``, whose descriptor ``fd`` was just unlocked (``unlocked``;
    else closing it unlocks it): touch the file (``touch``), which wakes waiters, and keep ``fd``
    open for the next acquisition if it is still the one kept (``forget`` may have dropped it),
    else close it. Whether ``info`` still held ``path`` (``forget`` was not called meanwhile)."""
    with _lock:
        ours = _held.get(path) is info
        if ours:
            del _held[path]
        cached = _open_files.get(path)
        keep = cached is not None and cached.fd == fd
        if keep and not unlocked:
            del _open_files[path]
            keep = False
        # After unlocking, so waiters (inotify IN_ATTRIB) retry when they can win; under the
        # lock, so no other thread closes the descriptor for room meanwhile.
        if touch:
            with contextlib.suppress(OSError):  # waiters poll too
                os.utime(fd)
    if not keep:
        os.close(fd)
    return ours


def forget(path: str) -> None:
    """Forget ``path``, whose file was unlinked: a lock this process held on it is released by
    its lease, which closes its own descriptor."""
    with _lock:
        _held.pop(path, None)
        _shared.pop(path, None)
        _open_files.pop(path, None)


def join(
    path: str,
    gate: str | None,
    open_file: Callable[[str], OpenFile],
    lock: Callable[[OpenFile], bool],
) -> SharedHold | None:
    """A share in this process's shared flock on ``path``, taken with ``lock`` (called with
    the kept or a newly opened file, True when it flocked it and it is still at ``path``) if
    this process has none yet; None if a plain holder has the lock, or (``gate``) an exclusive
    locker waits at ``gate``. End it with ``leave``.

    The gate is looked at with a shared flock held until the share is taken; under this
    module's lock, so no other thread of this process flocks the same descriptors meanwhile.
    """
    with _lock:
        if path in _held or (gate is not None and filegates.waiting(gate)):
            return None
        gate_entry = None
        if gate is not None:
            gate_entry = _kept_or_open(gate, open_file)
            try:
                fcntl.flock(gate_entry.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # an exclusive locker of another process waits
        try:
            return _join(path, open_file, lock)
        finally:
            # Unless opening the lock file closed it for room (which unlocked it).
            if gate is not None and gate_entry is not None and _open_files.get(gate) is gate_entry:
                fcntl.flock(gate_entry.fd, fcntl.LOCK_UN)


def _join(
    path: str, open_file: Callable[[str], OpenFile], lock: Callable[[OpenFile], bool]
) -> SharedHold | None:
    hold = _shared.get(path)
    if hold is not None and hold.entry.stat_if_at(path) is not None:
        hold.count += 1
        return hold
    _shared.pop(path, None)  # its file was replaced: its holders keep the old one
    for _ in range(5):
        entry = _kept_or_open(path, open_file)
        if lock(entry):
            hold = _shared[path] = SharedHold(path, entry)
            return hold
        if entry.stat_if_at(path) is not None:
            return None  # held by a plain holder
        del _open_files[path]  # replaced: lock the new one
        os.close(entry.fd)
    return None


def _kept_or_open(path: str, open_file: Callable[[str], OpenFile]) -> OpenFile:
    entry = _open_files.get(path)
    if entry is None:
        entry = open_file(path)
        _keep(path, entry)
    return entry


def leave(hold: SharedHold) -> None:
    """End one share of ``hold``, touching the file (waking the lockers that wait: a slot or a
    shared hold may be free now); the last one unlocks the file first."""
    with _lock:
        hold.count -= 1
        if hold.count:
            with contextlib.suppress(OSError):  # waiters poll too
                os.utime(hold.entry.fd)
            return
        if _shared.get(hold.path) is hold:
            del _shared[hold.path]
        fd = hold.entry.fd
        keep = _open_files.get(hold.path) is hold.entry
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:  # closing it unlocks it all the same
            keep = False
            _open_files.pop(hold.path, None)
        with contextlib.suppress(OSError):  # waiters poll too
            os.utime(fd)
    if not keep:
        os.close(fd)
