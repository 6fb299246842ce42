"""Who holds a lock: the holder record, this host's identity, and liveness via psutil.

The rule is filelock's: *fail closed*. A holder is called dead only with proof: it ran on this
host (same boot, same PID namespace), and its PID is gone, a zombie, or now belongs to a process
that started at another time (PID reuse). A holder from another host, boot or PID namespace is
``None`` (cannot tell), never dead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cache, lru_cache
from typing import Any, NamedTuple

import psutil

from django_isolatable.conf import isolatable_settings

# Start times are compared net of boot-time changes (see host_id), so one process's start times
# agree to the clock tick; this only absorbs float rounding.
START_TIME_TOLERANCE = 0.05
#: The largest process id any system gives out (``pid_t`` is a signed 32-bit integer).
MAX_PID = 2**31 - 1


@dataclass(frozen=True)
class LockInfo:
    """A lock holder's record. Datetimes are timezone-aware UTC; unknown fields are None.

    ``alive`` is True (the holder runs), False (it is dead: the record is stale) or None (cannot
    tell: another host, boot or PID namespace, or an unreadable record).
    """

    name: str
    strategy: str
    token: str | None = None
    pid: int | None = None
    hostname: str | None = None
    host_id: str | None = None
    process_started_at: datetime | None = None
    acquired_at: datetime | None = None
    expires_at: datetime | None = None
    argv: tuple[str, ...] = ()
    label: str | None = None
    #: ``"exclusive"`` (a plain lock), ``"shared"`` (``lock(shared=True)``) or ``"semaphore"``
    #: (one of ``max_holders`` slots).
    mode: str = "exclusive"
    #: The holder count this holder's lock allows (``CommandIsolation(max_holders=N)``).
    max_holders: int = 1
    alive: bool | None = None
    #: The fencing token this holder was issued (``guard.fencing_token``); None until it read one.
    fencing_token: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (datetimes as ISO 8601); ``alive`` is left out."""
        return {
            "name": self.name,
            "strategy": self.strategy,
            "token": self.token,
            "pid": self.pid,
            "hostname": self.hostname,
            "host_id": self.host_id,
            "process_started_at": _iso(self.process_started_at),
            "acquired_at": _iso(self.acquired_at),
            "expires_at": _iso(self.expires_at),
            "argv": list(self.argv),
            "label": self.label,
            "mode": self.mode,
            "max_holders": self.max_holders,
            "fencing_token": self.fencing_token,
        }

    def to_json(self) -> str:
        """``to_dict`` as one line of JSON that always encodes to UTF-8: lone surrogates (from
        undecodable argv bytes, or odd names) are escaped. ``fencing_token`` comes last (see
        ``fenced_json_prefix``)."""
        # Every lock of a process records the same process fields: they are encoded once.
        process, argv = _process_json(
            self.pid, self.hostname, self.host_id, self.process_started_at, self.argv
        )
        text = (
            f'{{"name": {_encode(self.name)}, "strategy": {_encode(self.strategy)}, '
            f'"token": {_encode(self.token)}, {process}, '
            f'"acquired_at": {_iso_json(self.acquired_at)}, '
            f'"expires_at": {_iso_json(self.expires_at)}, {argv}, '
            f'"label": {_encode(self.label)}, "mode": "{self.mode}", '
            f'"max_holders": {self.max_holders:d}, '
            f'"fencing_token": {_number(self.fencing_token)}}}\n'
        )
        if not _utf8_safe(text):
            text = json.dumps(self.to_dict()) + "\n"
        return text

    def fenced_json_prefix(self) -> str:
        """``to_json`` of this record with a fencing token, up to the token's digits: a store
        that counts the token itself appends them and ``"}\n"``."""
        return replace_token(self, None).to_json()[: -len("null}\n")]

    @classmethod
    def from_dict(cls, name: str, strategy: str, data: object) -> LockInfo:
        """Read a record written by ``to_dict``; anything missing or malformed becomes unknown.

        ``name`` and ``strategy`` come from the caller (who knows which lock it read), not from
        the data, so a tampered record cannot impersonate another lock.
        """
        if not isinstance(data, dict):
            return cls(name=name, strategy=strategy)
        argv = data.get("argv")
        return cls(
            name=name,
            strategy=strategy,
            token=_typed(data.get("token"), str),
            pid=_typed(data.get("pid"), int),
            hostname=_typed(data.get("hostname"), str),
            host_id=_typed(data.get("host_id"), str),
            process_started_at=_datetime(data.get("process_started_at")),
            acquired_at=_datetime(data.get("acquired_at")),
            expires_at=_datetime(data.get("expires_at")),
            argv=tuple(a for a in argv if isinstance(a, str)) if isinstance(argv, list) else (),
            label=_typed(data.get("label"), str),
            mode=_mode(data.get("mode")),
            max_holders=_max_holders(data.get("max_holders")),
            fencing_token=_fencing_token(data.get("fencing_token")),
        )

    @classmethod
    def from_json(cls, name: str, strategy: str, text: str | bytes) -> LockInfo | None:
        """Parse a JSON record; None when there is no record (empty), unknown fields if corrupt."""
        if not text.strip():
            return None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # corrupt, or nested too deep to parse: unknown
            data = None
        return cls.from_dict(name, strategy, data)


_encode = json.JSONEncoder(ensure_ascii=False).encode


def _number(value: int | None) -> str:
    return "null" if value is None else f"{value:d}"


def replace_token(info: LockInfo, token: int | None) -> LockInfo:
    """``info`` with the fencing token ``token``."""
    return info if info.fencing_token == token else dataclasses.replace(info, fencing_token=token)


#: The largest fencing token a store counts to (a signed 64-bit integer, as Redis and SQL).
MAX_FENCING_TOKEN = 2**63 - 1


def _fencing_token(value: object) -> int | None:
    number = _typed(value, int)
    return number if number is not None and 1 <= number <= MAX_FENCING_TOKEN else None


@lru_cache(maxsize=64)
def _process_json(
    pid: int | None,
    hostname: str | None,
    host_id: str | None,
    started: datetime | None,
    argv: tuple[str, ...],
) -> tuple[str, str]:
    """The process fields of a record as ``to_dict`` has them, as JSON members: the ones before
    the record's times, and ``argv``, which follows them."""
    head = {"pid": pid, "hostname": hostname, "host_id": host_id}
    return (
        _encode({**head, "process_started_at": _iso(started)})[1:-1],
        _encode({"argv": list(argv)})[1:-1],
    )


def _utf8_safe(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:  # lone surrogates: from undecodable argv bytes, or odd names
        return False
    return True


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _iso_json(value: datetime | None) -> str:
    # An ISO 8601 time is digits and "-:.+T" only: nothing JSON escapes.
    return "null" if value is None else f'"{value.isoformat()}"'


def _typed(value: object, kind: type[Any]) -> Any:
    if kind is int and isinstance(value, bool):
        return None
    return value if isinstance(value, kind) else None


MODES = ("exclusive", "shared", "semaphore")
#: The most holders a semaphore may allow.
MAX_HOLDERS = 10_000


def _mode(value: object) -> str:
    return value if isinstance(value, str) and value in MODES else "exclusive"


def _max_holders(value: object) -> int:
    number = _typed(value, int)
    return number if number is not None and 1 <= number <= MAX_HOLDERS else 1


def _datetime(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
        # An offset can carry a time past the ends of datetime's range: year 1 at +05:00.
        return None if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        return None


def printable(text: str) -> str:
    """``text`` as it is safe to show on a terminal or in one cell of a table: each character
    that is not printable (line breaks, escape sequences and other control characters, lone
    surrogates from undecodable bytes, invisible formatting) as its Python escape (``\\n``,
    ``\\x1b``, ``\\udcff``), the others as they are. For lock names, hostnames and command
    lines read from a store, which anyone who can write there controls."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def from_epoch_microseconds(text: str) -> datetime | None:
    """The UTC time ``text`` gives in microseconds since 1970 (how the redis and postgres
    strategies carry a server's time), or None when it is not such a number."""
    # isdigit() alone would pass other scripts' digits and numbers too long for int().
    if not (text.isascii() and text.isdigit() and len(text) <= 20):
        return None
    microseconds = int(text)
    if not microseconds:
        return None
    try:
        # Exact to the microsecond until 2255 (2**53 µs): a double then resolves a quarter of
        # one, and fromtimestamp rounds to the nearest.
        return datetime.fromtimestamp(microseconds / 1_000_000, timezone.utc)
    except (OverflowError, ValueError, OSError):  # not a time this code wrote
        return None


def new_token() -> str:
    """A random owner token: 32 hex digits."""
    return secrets.token_hex(16)


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.readline().strip() or None
    except OSError:
        return None


@cache
def host_id() -> str:
    """This host's identity for liveness checks, read once per process.

    The boot id and PID namespace where Linux has them: two containers on one machine share the
    boot id but not the PID namespace, so a PID recorded in one is never judged from the other.
    Plus the boot time as the kernel reported it (``btime``) when this process computed its own
    start time: start times are boot time plus clock ticks, and the kernel's boot time moves when
    the wall clock is stepped or slewed, so ``is_alive`` compares start times net of it.
    """
    btime = int(psutil.boot_time())
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    if boot is None:
        return f"host={socket.gethostname()} btime={btime}"
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = "unknown"
    return f"boot={boot} {namespace} btime={btime}"


os.register_at_fork(after_in_child=host_id.cache_clear)  # a child reads its own boot time


def _machine_and_btime(identity: str) -> tuple[str, int | None]:
    """(the host part of a host id, the boot time it recorded)."""
    machine, _, btime = identity.rpartition(" btime=")
    if machine and btime.isascii() and btime.isdigit() and len(btime) <= 20:
        return machine, int(btime)
    return identity, None


def process_started_at(pid: int) -> datetime:
    return datetime.fromtimestamp(psutil.Process(pid).create_time(), timezone.utc)


def new_record(
    name: str,
    strategy: str,
    *,
    ttl: float | None = None,
    now: datetime | None = None,
    token: str | None = None,
    label: str | None = None,
    mode: str = "exclusive",
    max_holders: int = 1,
) -> LockInfo:
    """A fresh record for the current process taking ``name``, with a new random owner token
    (or ``token``, one the backend already gave the store), the caller's ``label``, and the
    kind of hold (``mode``, ``max_holders``)."""
    acquired_at = now or datetime.now(timezone.utc)
    process = _this_process()
    return LockInfo(
        name=name,
        strategy=strategy,
        token=token or new_token(),
        pid=process.pid,
        hostname=process.hostname,
        host_id=process.host_id,
        process_started_at=process.started_at,
        acquired_at=acquired_at,
        expires_at=None if ttl is None else acquired_at + timedelta(seconds=ttl),
        argv=recorded_argv(),
        label=label,
        mode=mode,
        max_holders=max_holders,
        alive=True,
    )


def recorded_argv() -> tuple[str, ...]:
    """The command line a new record keeps, as ``RECORD_ARGV`` says: all of it (``"full"``),
    the program and the management command's name (``"command"``), or nothing (``"none"``).

    The command's name is the first argument, as Django's ``manage.py`` takes it, unless that is
    an option: what follows an option may be its value, and any value may be a secret.
    """
    mode = isolatable_settings.RECORD_ARGV
    if mode == "full":
        return tuple(sys.argv)
    if mode == "none":
        return ()
    return tuple(sys.argv[:1]) + tuple(arg for arg in sys.argv[1:2] if not arg.startswith("-"))


class _Process(NamedTuple):
    """This process's part of a record."""

    pid: int
    hostname: str
    host_id: str
    started_at: datetime


_process: _Process | None = None


def _this_process() -> _Process:
    """This process's part of a record, read once per process, not on every acquire: it reads
    /proc. A forked child forgets its parent's (``_forget_process``) and reads its own."""
    global _process
    if _process is None:
        pid = os.getpid()
        identity = host_id()  # first: the start time is computed from the boot time it recorded
        _process = _Process(pid, socket.gethostname(), identity, process_started_at(pid))
    return _process


def this_pid() -> int:
    """``os.getpid()``, asked of the kernel once per process: every fork that returns to Python
    runs the at-fork hooks, where a child forgets its parent's (as ``heldfiles`` closes the lock
    files a child inherited)."""
    return _this_process().pid


def _forget_process() -> None:
    global _process
    _process = None


os.register_at_fork(after_in_child=_forget_process)


def is_alive(info: LockInfo) -> bool | None:
    """Judge the recorded holder: True alive, False dead (with proof), None cannot tell.

    Dead means: on this host (same boot and PID namespace), and its PID is gone, a zombie, or
    now names a process that started at another time (the PID was reused). Start times are
    compared net of any change of the kernel's boot time since the record was written, so a
    stepped wall clock never makes a live holder look like a reused PID.
    """
    if info.pid is None or info.process_started_at is None or info.host_id is None:
        return None
    if not 0 < info.pid <= MAX_PID:  # no process can have it: not a record this code wrote
        return None
    machine, recorded_btime = _machine_and_btime(info.host_id)
    if recorded_btime is None or machine != _machine_and_btime(host_id())[0]:
        return None
    try:
        process = psutil.Process(info.pid)
        with process.oneshot():  # status and start time from one read of /proc/<pid>/stat
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            btime = psutil.boot_time()  # refreshes the boot time start times are computed from
            started = process.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess is a subclass: a zombie is dead too
        return False
    except (psutil.Error, ValueError, OverflowError):
        return None
    shift = started - info.process_started_at.timestamp()
    return abs(shift - (btime - recorded_btime)) <= START_TIME_TOLERANCE


def judged(info: LockInfo) -> LockInfo:
    """``info`` with ``alive`` filled in by ``is_alive`` unless the backend already knew it."""
    if info.alive is not None:
        return info
    return dataclasses.replace(info, alive=is_alive(info))
