"""One lock file of the file strategy: its name, one-call ``flock`` attempts and its record; and
LOCK_DIR, opened and checked once, relative to which lock files are opened and checked, so that
another local user cannot steer a lock (LOCK_DIR's owner, mode and links; a file's owner,
links and mode).

The per-process tables (which locks this process holds, which lock files it keeps open) and the
strategy itself are in ``backends/file.py``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import random
import stat
import threading
import time
import weakref
from pathlib import Path

from django_isolatable.errors import (
    LockFileError,
    LockIOError,
    LockPermissionError,
    UnsafeLockLocation,
)
from django_isolatable.holders import LockInfo

logger = logging.getLogger("django_isolatable.backends.file")

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_READABLE = 120  # characters of the escaped name kept before a long name is hashed
MAX_RECORD = 64 * 1024
SUFFIX = ".lock"
PROBE_PATIENCE = 0.05  # seconds an acquirer waits out other processes' looks at a free lock
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted FIFO never hangs
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FIX = (
    'point settings.ISOLATABLE["LOCK_DIR"] (or BASE_DIR) at a directory that only this user can '
    "write"
)


@functools.lru_cache(maxsize=4096)
def file_name(name: str) -> str:
    """Map a lock name to a file name, injectively: safe characters stay, the rest is %XX.

    A leading dot is escaped (no hidden files, no ``..``); a name whose escaped form is long
    keeps a readable prefix plus the SHA-256 of the whole name after ``~``, a character that
    escaped names never contain. The result is at most 190 bytes, under every filesystem's limit.
    """
    escaped = "".join(
        ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        for ch in name
    )
    if escaped.startswith("."):
        escaped = "%2E" + escaped[1:]
    if len(escaped) > _MAX_READABLE:
        prefix = escaped[:_MAX_READABLE]
        cut = prefix.rfind("%", len(prefix) - 2)
        prefix = prefix[:cut] if cut >= 0 else prefix
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
        escaped = f"{prefix}~{digest}"
    return escaped + SUFFIX


def os_error(e: OSError, path: str, lock_dir: Path) -> Exception:
    """The error to raise for ``e`` from opening a lock file or making LOCK_DIR: it names the
    path and the fix."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LockPermissionError(lock_dir)
    if e.errno == errno.ELOOP:
        return LockFileError(
            f"{path} is a symbolic link; lock files never follow links, remove it."
        )
    if e.errno == errno.EISDIR:
        return LockFileError(f"{path} is a directory; remove it so locks can use that name.")
    if e.errno == errno.ENOTDIR:
        return LockFileError(
            f"LOCK_DIR {lock_dir} is not a directory; point "
            'settings.ISOLATABLE["LOCK_DIR"] at a directory.'
        )
    return LockIOError(f"Could not use lock file {path}: {e.strerror or e}.")


def directory_problem(lock_dir: Path, found: os.stat_result) -> str | None:
    """Why LOCK_DIR, as ``lstat`` or ``fstat`` found it, must not be used, or None if it may.

    Another user must not be able to remove or replace its lock files (a held lock's file
    unlinked lets a second holder in) nor point it elsewhere: so it is no symbolic link, it
    belongs to this user, and it is writable by nobody else unless sticky (as /tmp is).
    """
    if stat.S_ISLNK(found.st_mode):
        reason = "is a symbolic link"
    elif found.st_uid != os.geteuid():
        reason = f"belongs to another user (uid {found.st_uid})"
    elif found.st_mode & 0o022 and not found.st_mode & stat.S_ISVTX:
        reason = f"is writable by other users and not sticky ({stat.filemode(found.st_mode)})"
    else:
        return None
    return (
        f"LOCK_DIR {lock_dir} {reason}, so other users could remove or replace its lock files; "
        f"{_FIX}."
    )


class LockDirectory:
    """LOCK_DIR as a descriptor, opened and checked (``directory_problem``) on first use, and
    the lock files in it, opened relative to that descriptor: a symbolic link put in its place
    after the check is never followed. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._prefix = os.path.join(path, "")
        self._fd = -1
        self._identity = (0, 0)  # st_dev, st_ino of the directory self._fd is
        # Descriptors of a LOCK_DIR that was replaced: another thread may still be opening a
        # file through one, so they are closed with this object, never while it is in use.
        self._retired: list[int] = []
        self._lock = threading.Lock()
        _directories.add(self)

    def __del__(self) -> None:
        for fd in (self._fd, *self._retired):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def fd(self, *, create: bool) -> int | None:
        """The checked descriptor; None if LOCK_DIR is missing (made, mode 0o700, first when
        ``create``). Raises ``UnsafeLockLocation``, ``LockFileError`` or
        ``LockPermissionError``."""
        fd = self._fd
        if fd < 0:
            with self._lock:
                if self._fd < 0:
                    opened = _open_directory(self.path, create=create)
                    if opened is not None:
                        found = os.fstat(opened)
                        self._fd, self._identity = opened, (found.st_dev, found.st_ino)
                fd = self._fd
        return None if fd < 0 else fd

    def recheck(self) -> bool:
        """True if LOCK_DIR's path no longer names the descriptor's directory (it was removed,
        moved aside or swapped for a link while this process ran): the next use opens and
        checks the path again."""
        with self._lock:
            if self._fd < 0:
                return False
            try:
                current = os.stat(self.path, follow_symlinks=False)
            except OSError:  # gone, or unreachable: opening it again says which
                pass
            else:
                if (current.st_dev, current.st_ino) == self._identity:
                    return False
            self._retired.append(self._fd)
            self._fd = -1
            return True

    def open(self, file: str, flags: int) -> tuple[int, os.stat_result]:
        """Open the lock file named ``file`` in the directory LOCK_DIR names now (never through
        a link, never blocking), checked with ``check_file``; its descriptor and stat.
        ``FileNotFoundError`` when it (or LOCK_DIR, unless creating) is missing."""
        path = self._prefix + file
        creating = bool(flags & os.O_CREAT)
        self.recheck()
        directory = self.fd(create=creating)
        if directory is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        try:
            fd = os.open(file, flags | _OPEN_FLAGS, 0o600, dir_fd=directory)
        except FileNotFoundError:
            raise  # no lock file: the caller's answer, not an error
        except OSError as e:
            raise os_error(e, path, self.path) from e
        opened = os.fstat(fd)
        try:
            check_file(fd, path, opened, writing=flags & os.O_ACCMODE != os.O_RDONLY)
        except BaseException:
            os.close(fd)
            raise
        return fd, opened


_directories: weakref.WeakSet[LockDirectory] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for directory in list(_directories):
        directory._lock = threading.Lock()  # another thread may have held it at fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def _open_directory(lock_dir: Path, *, create: bool) -> int | None:
    for attempt in range(2):
        try:
            fd = os.open(lock_dir, _DIR_FLAGS)
        except FileNotFoundError:
            if not create or attempt:
                return None
            _make_directory(lock_dir)
            continue
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP) and os.path.islink(lock_dir):
                problem = directory_problem(lock_dir, os.lstat(lock_dir))
                raise UnsafeLockLocation(lock_dir, str(problem)) from e
            raise os_error(e, str(lock_dir), lock_dir) from e
        problem = directory_problem(lock_dir, os.fstat(fd))
        if problem is not None:
            os.close(fd)
            raise UnsafeLockLocation(lock_dir, problem)
        return fd
    return None


def _make_directory(lock_dir: Path) -> None:
    try:
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    except FileExistsError as e:  # a file, or a link to one
        raise os_error(OSError(errno.ENOTDIR, "Not a directory"), str(lock_dir), lock_dir) from e
    except OSError as e:
        raise os_error(e, str(lock_dir), lock_dir) from e


def check_file(fd: int, path: str, opened: os.stat_result, *, writing: bool) -> None:
    """Refuse a lock file another user could read or steer; make one that is ours private.

    It must be a regular file with one link (a hard link to another file would get the record
    written into that file) that belongs to this user (a file another user planted in a sticky
    LOCK_DIR is theirs to read). Before a record is written, a file readable by others is made
    0o600: the record shows the holder's command line. Raises ``LockFileError`` or
    ``UnsafeLockLocation``, leaving the file as it was.
    """
    if not stat.S_ISREG(opened.st_mode):
        raise LockFileError(f"{path} is not a regular file; remove it so locks can use it.")
    if opened.st_nlink > 1:
        raise LockFileError(
            f"Lock file {path} has {opened.st_nlink} hard links, so its record would be written "
            "into another file; remove it so locks can use that name."
        )
    if opened.st_uid != os.geteuid():
        raise UnsafeLockLocation(
            path,
            f"Lock file {path} belongs to another user (uid {opened.st_uid}), so its record is "
            f"never written there; remove it, or {_FIX}.",
        )
    if writing and opened.st_mode & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError as e:
            raise os_error(e, path, Path(path).parent) from e


def try_flock(fd: int, path: str, *, shared: bool = False) -> bool:
    """One non-blocking flock; False if someone holds it (exclusively, for ``shared``).

    Holders lock exclusively and ``inspect`` shares for an instant, so when only shared locks
    are in the way the exclusive attempt is retried for up to ``PROBE_PATIENCE`` seconds
    instead of reporting "held" because somebody looked at the lock.
    """
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    deadline = None
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if shared:
                    return False
            else:
                if shared:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # an exclusive holder
            fcntl.flock(fd, fcntl.LOCK_UN)
            now = time.monotonic()
            deadline = deadline or now + PROBE_PATIENCE
            if now > deadline:
                return False
            time.sleep(random.uniform(0, 0.0002))  # jitter: two acquirers' checks never lock-step
    except OSError as e:
        raise LockIOError(f"Could not lock {path}: {e.strerror or e}.") from e


def write_record(fd: int, path: str, info: LockInfo, size: int | None = None) -> int:
    """Write the holder record over the blank (or a dead holder's) one; its size in bytes.

    A free lock's file is empty or blank: releasing overwrites the record with spaces instead
    of truncating it, because freeing and reallocating the file's block on every lock costs
    more than the rest of the lock. What a longer record left beyond this one is cut off.
    ``size`` is the file's size if the caller read it under the lock (else it is read here).
    """
    data = info.to_json().encode()
    try:
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.ENOSPC, "short write")
        if (os.fstat(fd).st_size if size is None else size) > len(data):
            os.ftruncate(fd, len(data))
    except OSError as e:
        truncate(fd)  # an empty record reads as "unknown holder", a torn one would too
        logger.warning(
            "Holding %s, but could not write its holder record (%s); "
            "`locks status` will show the holder as unknown.",
            path,
            e.strerror or e,
        )
        return 0
    return len(data)


def blank(fd: int, size: int) -> None:
    """Overwrite a record of ``size`` bytes with spaces: the file now reads as a free lock."""
    try:
        if size and os.pwrite(fd, b" " * (size - 1) + b"\n", 0) == size:
            return
    except OSError:
        pass
    truncate(fd)


def read_record(fd: int, name: str) -> LockInfo | None:
    """The record in the file; None if it is blank, every field unknown if it is corrupt."""
    text = os.pread(fd, MAX_RECORD, 0)
    try:
        return LockInfo.from_json(name, "file", text)
    except RecursionError:  # nested too deep for the parser: as corrupt as any other
        return LockInfo.from_json(name, "file", b"corrupt")


def truncate(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError as e:
        logger.warning("Could not empty a lock file's holder record: %s", e)
