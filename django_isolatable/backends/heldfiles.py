"""The file strategy's per-process tables: which lock files this process holds (or is taking),
and which it keeps open between acquisitions.

Threads exclude each other here before the kernel is asked, which also keeps NFS correct, where
flock is emulated with per-process POSIX locks. A lock file stays open after its lock is
released, so taking it again locks and unlocks the same descriptor in place; only the thread
that claimed a path uses its descriptor. The tables change only under one lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import NamedTuple

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


# Holders of the locks this process holds, by path; None while a thread is taking it.
_held: dict[str, LockInfo | None] = {}
_open_files: dict[str, OpenFile] = {}
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The child shares the parent's open file descriptions, hence its flocks: it must never
    # lock through them. Closing its copies leaves the parent's locks alone.
    global _lock
    _lock = threading.Lock()  # another thread may have held it at fork
    _held.clear()
    for entry in _open_files.values():
        with contextlib.suppress(OSError):
            os.close(entry.fd)
    _open_files.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def claim(path: str) -> bool:
    """Claim ``path`` for the calling thread's attempt; False if this process holds it or another
    thread is taking it. End the claim with ``settle``."""
    with _lock:
        if path in _held:
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


def kept(path: str) -> OpenFile | None:
    """The lock file kept open for ``path``, if any."""
    return _open_files.get(path)


def keep(path: str, entry: OpenFile) -> None:
    """Keep ``entry`` open for ``path``; past ``MAX_OPEN_FILES``, close the free ones first."""
    with _lock:
        if len(_open_files) >= MAX_OPEN_FILES:
            for other in [p for p in _open_files if p not in _held]:
                os.close(_open_files.pop(other).fd)
        _open_files[path] = entry


def close(path: str, entry: OpenFile) -> None:
    """Close a lock file's descriptor (unlocking it) and stop keeping it."""
    with _lock:
        if _open_files.get(path) is entry:
            del _open_files[path]
    os.close(entry.fd)


def close_free(prefix: str) -> None:
    """Close the kept lock files whose paths start with ``prefix`` and that no lock is on."""
    with _lock:
        free = [p for p in _open_files if p.startswith(prefix) and p not in _held]
        for path in free:
            os.close(_open_files.pop(path).fd)


def released(path: str, info: LockInfo, fd: int, *, unlocked: bool) -> None:
    """End ``info``'s lock on ``path``, whose descriptor ``fd`` was just unlocked (``unlocked``;
    else closing it unlocks it): touch the file, which wakes waiters, and keep ``fd`` open for
    the next acquisition if it is still the one kept (``forget`` may have dropped it), else close
    it."""
    with _lock:
        if _held.get(path) is info:
            del _held[path]
        cached = _open_files.get(path)
        keep = cached is not None and cached.fd == fd
        if keep and not unlocked:
            del _open_files[path]
            keep = False
        # After unlocking, so waiters (inotify IN_ATTRIB) retry when they can win; under the
        # lock, so no other thread closes the descriptor for room meanwhile.
        with contextlib.suppress(OSError):  # waiters poll too
            os.utime(fd)
    if not keep:
        os.close(fd)


def forget(path: str) -> None:
    """Forget ``path``, whose file was unlinked: a lock this process held on it is released by
    its lease, which closes its own descriptor."""
    with _lock:
        _held.pop(path, None)
        _open_files.pop(path, None)
