"""One lock file of the file strategy: its name (and its holder and gate files' names),
one-call ``flock`` attempts, its record, and releasing whoever is recorded in it.

LOCK_DIR, relative to which lock files are opened and checked, is in ``backends/lockdir.py``;
the per-process tables (which locks this process holds, which lock files it keeps open) are in
``backends/heldfiles.py``, the strategy itself in ``backends/file.py``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import time
from urllib.parse import unquote

from django_isolatable.backends import heldfiles
from django_isolatable.backends.lockdir import LockDirectory
from django_isolatable.errors import IsolationError, LockIOError
from django_isolatable.holders import LockInfo

logger = logging.getLogger("django_isolatable.backends.file")

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_READABLE = 120  # characters of the escaped name kept before a long name is hashed
MAX_RECORD = 64 * 1024
SUFFIX = ".lock"
#: Between a lock file's name and what its other files add: escaped names never contain it.
SEPARATOR = "+"
GATE = "gate"
FENCE = "fence"
#: What a lock file held by semaphore or shared holders reads as: no plain holder's record.
MARKER = b'{"held_by": "semaphore or shared holders, recorded in '
PROBE_PATIENCE = 0.05  # seconds an acquirer waits out other processes' looks at a free lock


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


def holder_file(main_file: str, slot: int) -> str:
    """The file of holder slot ``slot`` of the lock whose lock file is ``main_file``: a name
    no lock file and no other lock's holder file has (``SEPARATOR`` is always escaped)."""
    return f"{main_file}{SEPARATOR}{slot}"


def gate_file(main_file: str) -> str:
    """The file an exclusive locker that waits for ``main_file``'s lock holds (writer
    preference)."""
    return f"{main_file}{SEPARATOR}{GATE}"


def fence_file(main_file: str) -> str:
    """The file that counts the fencing tokens issued for ``main_file``'s lock."""
    return f"{main_file}{SEPARATOR}{FENCE}"


def name_of(directory: LockDirectory, entry_name: str, record_file: str = "") -> str | None:
    """The lock name a lock file in ``directory`` belongs to: unescaped, or read from the record
    (in ``record_file``, the lock file's own by default) for hashed ones; None if it is no lock
    file's name."""
    candidates = [unquote(entry_name[: -len(SUFFIX)], errors="surrogatepass")]
    if "~" in entry_name:  # hashed: only the record knows the name; trust it if it maps back
        try:
            fd, _ = directory.open(record_file or entry_name, os.O_RDONLY)
            try:
                data = json.loads(os.pread(fd, MAX_RECORD, 0))
            finally:
                os.close(fd)
        except (OSError, ValueError, RecursionError, IsolationError):
            data = None  # unknown: inspect() reports the file's own trouble, if any
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            candidates.append(data["name"])
    return next((c for c in candidates if c and file_name(c) == entry_name), None)


def try_flock(fd: int, path: str, *, shared: bool = False) -> bool:
    """One non-blocking flock; False if someone holds it (exclusively, for ``shared``).

    Plain holders lock exclusively and ``inspect`` shares for an instant, so when only shared
    locks are in the way the exclusive attempt is retried for up to ``PROBE_PATIENCE`` seconds
    instead of reporting "held" because somebody looked at the lock; unless the file holds
    ``MARKER``: semaphore and shared holders hold it shared, and ``inspect`` does not look at
    a lock file that reads so.
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
            if os.pread(fd, len(MARKER), 0) == MARKER:
                return False  # semaphore or shared holders, which a look never marks
            now = time.monotonic()
            if deadline is None:  # most often the holder released just now: at once, again
                deadline = now + PROBE_PATIENCE
            elif now > deadline:
                return False
            else:  # jitter: two acquirers' checks never lock-step
                time.sleep(random.uniform(0, 0.0002))
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


def hold_shared(fd: int, path: str, name: str) -> bool:
    """Take a shared flock for semaphore or shared holders (False: a plain holder has it), and
    see that the file reads as ``MARKER`` (plus the name, for ``name_of``)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        raise LockIOError(f"Could not lock {path}: {e.strerror or e}.") from e
    try:
        if os.pread(fd, len(MARKER), 0) != MARKER:
            # Every holder writes the same bytes, and no plain holder writes meanwhile.
            data = MARKER + f'its holder files", "name": {json.dumps(name)}}}\n'.encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
    except OSError as e:  # held all the same: a plain acquirer then waits out PROBE_PATIENCE
        logger.warning("Could not mark lock file %s as shared: %s", path, e.strerror or e)
    return True


def read_record(fd: int, name: str) -> LockInfo | None:
    """The record in the file; None if it is blank or ``MARKER``, every field unknown if it is
    corrupt."""
    text = os.pread(fd, MAX_RECORD, 0)
    if text.startswith(MARKER):
        return None
    try:
        return LockInfo.from_json(name, "file", text)
    except RecursionError:  # nested too deep for the parser: as corrupt as any other
        return LockInfo.from_json(name, "file", b"corrupt")


def record_is(fd: int, name: str, token: str) -> bool:
    """Whether the lock file's record is ``token``'s; one without a readable token is ``""``'s.
    A blank file is nobody's."""
    record = read_record(fd, name)
    return record is not None and (record.token or "") == token


def truncate(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError as e:
        logger.warning("Could not empty a lock file's holder record: %s", e)


def clear_if_stale(directory: LockDirectory, file: str, name: str, token: str) -> bool:
    """Empty the record in ``file`` if it is ``token``'s (an empty token: if the record has
    none, or cannot be read). Never while anyone holds the flock; free under flock, a record
    is stale whatever it says."""
    path = os.path.join(directory.path, file)
    if heldfiles.claimed(path) or heldfiles.sharing(path):
        return False  # this process holds it (opening it would drop the lock on NFS)
    try:
        fd, _ = directory.open(file, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        if not try_flock(fd, path) or not record_is(fd, name, token):
            return False
        truncate(fd)
        return True
    finally:
        os.close(fd)


def force_release(
    directory: LockDirectory, file: str, name: str, token: str | None, *, last: bool = False
) -> bool | None:
    """Release the holder recorded in ``file``, whoever it is (with ``token``: only while the
    record is that token's): True if released, False if there was nothing to release, None if
    a live holder it leaves alone holds it.

    Free under flock, the record is emptied. Held by a live process, which nobody can take the
    flock from, the file is unlinked so the next acquirer locks a new one while the old holder
    runs on (with ``token``: only if the record still carries it right before the unlink, or,
    ``last``, if it is a lock file held by semaphore or shared holders only).
    """
    path = os.path.join(directory.path, file)
    try:
        fd, _ = directory.open(file, os.O_RDWR)
        directory_fd = directory.fd(create=False)
    except FileNotFoundError:
        return False
    try:
        if try_flock(fd, path):
            if token is not None and not record_is(fd, name, token):
                return False
            had_record = read_record(fd, name) is not None
            truncate(fd)
            return had_record
        # Not if its holder released it since: a new holder's lock is not ours.
        shared_only = last and os.pread(fd, len(MARKER), 0) == MARKER
        if not (token is None or shared_only or record_is(fd, name, token)):
            return None
        os.unlink(file, dir_fd=directory_fd)
        heldfiles.forget(path)
        logger.info("Removed %s: its holder runs on without the lock", path)
        return True
    finally:
        os.close(fd)
