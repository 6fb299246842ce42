"""The periods ability (``once_per``) of the memory, file, redis and cache strategies, as mixins
their backend classes inherit (the database and postgres strategies' is ``periodtable.py``).

Each keeps one record per name, period length and period: the holder record of the run that
used it. Redis keeps it in a key of its own that expires on Redis's clock and counts periods on
``TIME``; the others count periods on this host's clock (the cache API has no clock of its
own). The memory strategy's records are the process's, the file strategy's one small file per
name beside its lock file (``<name>.ran``, under LOCK_DIR's safety rules), the cache strategy's
cache entries with a timeout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from django_isolatable.backends.base import Periods, period_ends
from django_isolatable.backends.lockfile import MAX_RECORD, SUFFIX, file_name
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo

if TYPE_CHECKING:
    import redis
    from django.core.cache import BaseCache

    from django_isolatable.backends.base import BackendOptions
    from django_isolatable.backends.lockdir import LockDirectory

RAN_SUFFIX = ".ran"


def _period_key(period_seconds: float, period_index: int) -> str:
    """``3600.0:491234``: one period of one length, the same text in every process."""
    return f"{float(period_seconds)!r}:{int(period_index)}"


class LocalClock:
    """The clock of this host: for stores that have none of their own."""

    def store_time(self) -> float:
        return time.time()


_memory_runs: dict[tuple[str, str], tuple[float, LockInfo]] = {}
_memory_lock = threading.Lock()


def _forget_memory_runs() -> None:
    global _memory_lock
    _memory_runs.clear()  # as the memory strategy's locks: a forked child starts empty
    _memory_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_memory_runs)


class MemoryPeriods(LocalClock, Periods):
    """The memory strategy's records: this process's, on this host's clock."""

    if TYPE_CHECKING:

        def _key(self, name: str) -> str: ...

    def ran_in(self, name: str, period_seconds: float, period_index: int) -> LockInfo | None:
        key = (self._key(name), _period_key(period_seconds, period_index))
        with _memory_lock:
            found = _memory_runs.get(key)
        return None if found is None else found[1]

    def record_run(
        self, name: str, period_seconds: float, period_index: int, info: LockInfo
    ) -> None:
        now = time.time()
        with _memory_lock:
            for key in [key for key, (ends, _) in _memory_runs.items() if ends < now]:
                del _memory_runs[key]
            key = (self._key(name), _period_key(period_seconds, period_index))
            _memory_runs[key] = (period_ends(period_seconds, period_index), info)


class FilePeriods(LocalClock, Periods):
    """The file strategy's records: ``<LOCK_DIR>/<safe name>.ran``, a JSON list of the runs of
    the recent periods (those not over a period ago), on this host's clock. Opened relative to
    LOCK_DIR's checked descriptor with the lock files' checks (``LockDirectory.open``); written
    in place while the name's lock is held."""

    if TYPE_CHECKING:
        _directory: LockDirectory

    def _ran_file(self, name: str) -> str:
        # Lock files end in ".lock", these in ".ran": the two never share a name.
        return file_name(name)[: -len(SUFFIX)] + RAN_SUFFIX

    def _runs(self, fd: int) -> list[dict[str, Any]]:
        try:
            runs = json.loads(os.pread(fd, MAX_RECORD, 0) or b"[]")
        except (ValueError, RecursionError):
            return []  # torn or written by hand: no run recorded
        return [run for run in runs if isinstance(run, dict)] if isinstance(runs, list) else []

    def ran_in(self, name: str, period_seconds: float, period_index: int) -> LockInfo | None:
        try:
            fd, _ = self._directory.open(self._ran_file(name), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            runs = self._runs(fd)
        finally:
            os.close(fd)
        period = _period_key(period_seconds, period_index)
        for run in runs:
            if run.get("period") == period:
                return LockInfo.from_dict(name, "file", run.get("record"))
        return None

    def record_run(
        self, name: str, period_seconds: float, period_index: int, info: LockInfo
    ) -> None:
        file = self._ran_file(name)
        fd, _ = self._directory.open(file, os.O_RDWR | os.O_CREAT)
        try:
            # The runs of periods that ended a period ago or more go: the file stays small,
            # and a clock stepped by less than a period never drops the current one's.
            now = time.time()
            runs = [
                run
                for run in self._runs(fd)
                if isinstance(run.get("ends"), (int, float)) and run["ends"] >= now - period_seconds
            ]
            runs.append(
                {
                    "period": _period_key(period_seconds, period_index),
                    "ends": period_ends(period_seconds, period_index),
                    "record": info.to_dict(),
                }
            )
            data = json.dumps(runs).encode()
            if os.pwrite(fd, data, 0) != len(data):
                raise OSError("short write")
            os.ftruncate(fd, len(data))
        except OSError as e:
            raise LockIOError(f"Could not record the run of {name} in {file}: {e}.") from e
        finally:
            os.close(fd)


class RedisPeriods(Periods):
    """The redis strategy's records: ``<KEY_PREFIX>isolatable:ran:<length>:<period>:<name>``
    (in a cluster the name's hash tag after ``isolatable:``), one ``SET ... EXAT`` each, on
    Redis's clock (``TIME``), which also expires them."""

    if TYPE_CHECKING:
        client: redis.Redis  # or a redis.cluster.RedisCluster

        def _base(self, name: str) -> bytes: ...
        def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any: ...

    def _ran_key(self, name: str, period_seconds: float, period_index: int) -> bytes:
        period = _period_key(period_seconds, period_index).encode()
        return self._base(name) + b"ran:" + period + b":" + name.encode("utf-8", "surrogatepass")

    def store_time(self) -> float:
        seconds, microseconds = self._call("read the time", self.client.time)
        return float(seconds) + float(microseconds) / 1_000_000

    def ran_in(self, name: str, period_seconds: float, period_index: int) -> LockInfo | None:
        key = self._ran_key(name, period_seconds, period_index)
        value = self._call("read a run", self.client.get, key)
        return None if value is None else LockInfo.from_json(name, "redis", value)

    def record_run(
        self, name: str, period_seconds: float, period_index: int, info: LockInfo
    ) -> None:
        key = self._ran_key(name, period_seconds, period_index)
        value = info.to_json().encode("utf-8", "surrogatepass")
        ends = math.ceil(period_ends(period_seconds, period_index))
        self._call("record a run", self.client.set, key, value, exat=ends)


class CachePeriods(LocalClock, Periods):
    """The cache strategy's records: one cache entry per name and period whose timeout ends
    with the period, on this host's clock (Django's cache API has no clock of its own)."""

    if TYPE_CHECKING:
        options: BackendOptions

        @property
        def cache(self) -> BaseCache: ...

        def _call(self, what: str, function: Any, *args: Any) -> Any: ...

    def _ran_key(self, name: str, period_seconds: float, period_index: int) -> str:
        # Only the prefix may hold a NUL, so the parts are told apart from the right.
        period = _period_key(period_seconds, period_index)
        key = f"{self.options.key_prefix}\0{name}\0{period}".encode("utf-8", "surrogatepass")
        return f"isolatable-ran:{hashlib.sha256(key).hexdigest()}"

    def ran_in(self, name: str, period_seconds: float, period_index: int) -> LockInfo | None:
        key = self._ran_key(name, period_seconds, period_index)
        value = self._call("read a run", self.cache.get, key)
        return None if value is None else LockInfo.from_dict(name, "cache", value)

    def record_run(
        self, name: str, period_seconds: float, period_index: int, info: LockInfo
    ) -> None:
        key = self._ran_key(name, period_seconds, period_index)
        timeout = max(1, math.ceil(period_ends(period_seconds, period_index) - time.time()))
        self._call("record a run", self.cache.set, key, info.to_dict(), timeout)
