"""Fencing tokens of the file strategy, and the wait of a semaphore's or shared lock's waiter.

A name's tokens are counted in its fence file, ``<lock file>+fence`` (``lockfile.fence_file``),
as decimal text, under an exclusive ``flock`` of that file. A token is issued only after a look,
under that ``flock``, that the holder's file is still the one at its path: a holder whose lock
was force-released (its file unlinked) gets none, and one whose look came first got a smaller
token than any later holder's. The holder's record in its lock (or holder) file is rewritten with
the token, for ``locks status``. The count lives as long as the fence file: removing it (or
LOCK_DIR) starts the count again.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import TYPE_CHECKING

from django_isolatable.backends import heldfiles, inotify, lockdir, lockfile
from django_isolatable.backends.base import Lease
from django_isolatable.backends.lockfile import file_name
from django_isolatable.errors import LockIOError
from django_isolatable.holders import replace_token

if TYPE_CHECKING:
    from django_isolatable.backends.file import FileBackend

#: Enough digits for any count a name reaches.
MAX_DIGITS = 20


def issue(backend: FileBackend, lease: Lease) -> int | None:
    """The next fencing token of ``lease``'s name, if ``lease`` still holds it; else None."""
    from django_isolatable.backends.file import FileLease

    if not isinstance(lease, FileLease) or lease.fd < 0:
        return None
    fence = lockfile.fence_file(file_name(lease.name))
    try:
        fd, _ = backend._directory.open(fence, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        raise lockdir.os_error(e, backend._dir + fence, backend.lock_dir) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a read and a write: never long
        if not _still_at(lease.fd, lease.path):
            return None
        text = os.pread(fd, MAX_DIGITS + 1, 0).strip()
        if text and not (text.isdigit() and len(text) <= MAX_DIGITS):
            raise LockIOError(
                f"The fence file {backend._dir + fence} does not hold a count ({text[:40]!r}); "
                "remove it only if no holder of this lock has fenced a token yet."
            )
        token = int(text or 0) + 1
        data = str(token).encode()
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        # The holder's record shows the token too, rewritten under the holder's own flock.
        info = replace_token(lease.info, token)
        lease.record_size = lockfile.write_record(lease.fd, lease.path, info, lease.record_size)
        heldfiles.rerecord(lease.path, lease.info, info)  # what this process shows of it
        lease.info = info
        return token
    except OSError as e:
        raise lockdir.os_error(e, backend._dir + fence, backend.lock_dir) from e
    finally:
        os.close(fd)  # unlocks it


def _still_at(fd: int, path: str) -> bool:
    """Whether the file open as ``fd`` is still the one at ``path`` (not force-released)."""
    try:
        found, opened = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


def wait_for_release(backend: FileBackend, name: str, timeout: float) -> None:
    """Sleep until the name's lock file is touched (a release of any of its holds touches it)
    or ``poll_interval`` passed (other hosts' releases on NFS reach no inotify watch)."""
    seconds = min(timeout, backend.poll_interval)
    file_watch, new = inotify.watch(backend._path(name))
    if new:
        return  # attempt again with the watch in place: no release is missed
    if file_watch is None:
        time.sleep(seconds)
    else:
        file_watch.wait(seconds)
