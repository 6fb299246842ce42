"""The cache strategy: Django's cache ``add()`` (atomic set-if-absent) with a TTL.

Safe only on caches whose ``add`` is atomic and shared by every process: Redis (Django's
RedisCache, django-redis) and Memcached. A system check warns about the others: LocMem is per
process, Dummy stores nothing, and the file-based and database caches implement ``add`` as a
read then a write, which two processes can both win (measured: several holders at once).
Renewal is ``touch`` and release is ``delete``, each after checking that the stored token is
ours: the cache API has no compare-and-delete, so there is a window of one round trip in which
a lease that expires right then could be taken by another process and then deleted by us.
Renewal every TTL/3 keeps leases far from expiry, which keeps that window closed in practice.
The cache cannot list its keys, so the locks are also recorded in a best-effort index entry
that ``locks status`` reads; name a lock (``locks status NAME``) to be sure to see it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

from django.core.cache import BaseCache, InvalidCacheBackendError, caches
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import ImproperlyConfigured

from django_isolatable.backends.base import Backend, BackendOptions, Fencing, Lease
from django_isolatable.backends.cacheslots import CacheSlots, SlotLease, header_slots
from django_isolatable.backends.periods import CachePeriods
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, replace_token

#: Django caches whose add() cannot make a lock, and why.
UNSAFE_CACHES = {
    "django.core.cache.backends.locmem.LocMemCache": "other processes cannot see it",
    "django.core.cache.backends.dummy.DummyCache": "it stores nothing",
    "django.core.cache.backends.filebased.FileBasedCache": "its add() is a read then a write",
    "django.core.cache.backends.db.DatabaseCache": "its add() is a read then a write",
}
_index_lock = threading.Lock()
logger = logging.getLogger(__name__)


class CacheBackend(Backend, CacheSlots, Fencing, CachePeriods):
    strategy: ClassVar[str] = "cache"
    expiring: ClassVar[bool] = True
    heartbeat: ClassVar[bool] = True
    poll_interval: ClassVar[float] = 0.04

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.alias = options.cache_alias
        prefix = self.options.key_prefix.encode("utf-8", "surrogatepass")
        self._index = f"isolatable-index:{hashlib.sha256(prefix).hexdigest()}"
        self.cache  # noqa: B018 - fail now, with the alias in the message, if it is wrong

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        from django.conf import settings

        configured = getattr(settings, "CACHES", {}).get(options.cache_alias)
        if configured is None:
            return [
                Error(
                    f'settings.ISOLATABLE["CACHE_ALIAS"] is {options.cache_alias!r}, which is not '
                    "in settings.CACHES.",
                    id="isolatable.E050",
                )
            ]
        reason = UNSAFE_CACHES.get(configured.get("BACKEND", ""))
        if reason is not None:
            return [
                Warning(
                    f"The cache strategy uses cache {options.cache_alias!r} "
                    f"({configured['BACKEND']}), where {reason}: its locks will not reliably "
                    "exclude other processes. Use a Redis or Memcached cache.",
                    id="isolatable.W050",
                )
            ]
        return []

    @property
    def cache(self) -> BaseCache:
        try:
            return caches[self.alias]  # one client per thread, as Django keeps them
        except InvalidCacheBackendError as e:
            raise ImproperlyConfigured(
                f'settings.ISOLATABLE["CACHE_ALIAS"] is {self.alias!r}, which is not in '
                "settings.CACHES."
            ) from e

    def _key(self, name: str) -> str:
        # Hashed: Memcached refuses long keys and spaces; KEY_PREFIX namespaces shared caches.
        # A NUL ends the prefix (names never hold one), so no two (prefix, name) pairs share a
        # key; without a prefix the key is the name's own hash, as before prefixes were kept apart.
        prefix = self.options.key_prefix
        key = f"{prefix}\0{name}" if prefix else name
        return f"isolatable:{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"

    def _call(self, what: str, function: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except Exception as e:  # each cache client raises its own errors
            raise LockIOError(f"Cache {self.alias!r} failed to {what}: {e}") from e

    def _ttl(self, ttl: float) -> int:
        return max(1, math.ceil(ttl))  # caches count whole seconds

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        value = {"token": info.token, "record": info.to_dict()}
        if not self._call(
            "lock", self.cache.add, self._key(name), value, self._ttl(self.options.ttl)
        ):
            return None
        self._update_index(name)
        return Lease(name=name, token=info.token or "", info=info)

    def _owned(self, name: str, token: str) -> bool:
        value = self._call("read", self.cache.get, self._key(name))
        return isinstance(value, dict) and value.get("token") == token

    def release(self, lease: Lease) -> bool:
        if lease.pid != os.getpid():
            return False  # a forked child's copy: the lock is its parent's
        if lease.info.mode == "semaphore":
            return self._release_slot(lease)
        return self.force_release(lease.name, lease.token)

    def refresh(self, lease: Lease, ttl: float) -> bool:
        if lease.info.mode == "semaphore":
            return self._refresh_slot(lease, ttl)
        if not self._owned(lease.name, lease.token):
            return False
        return bool(self._call("renew", self.cache.touch, self._key(lease.name), self._ttl(ttl)))

    def fencing_token(self, lease: Lease) -> int | None:
        """The name's next count (``incr`` of its fence entry, kept with no timeout), after a
        look that ``lease`` still holds the lock. Two steps, not one: a cache has no
        compare-and-increment, so a holder whose lease ends between them still gets a token
        (docs/cache-strategy.md)."""
        key: str | None = self._key(lease.name)
        if lease.info.mode == "semaphore":
            key = lease.key if isinstance(lease, SlotLease) else None
            key = key or self._slot_key_of(lease.name, lease.token, lease.info.max_holders)
        if key is None or not self._entry_is(key, lease.token):
            return None
        token = self._count(lease.name)
        # The entry shows the token too (for `locks status`), with a lease as long as a
        # renewal's; looked at again first, so that the window of a lease ending right then
        # is one round trip, as release's.
        if self._entry_is(key, lease.token):
            value = {"token": lease.token, "record": replace_token(lease.info, token).to_dict()}
            self._call("record the token", self.cache.set, key, value, self._ttl(self.options.ttl))
        return token

    def _entry_is(self, key: str, token: str) -> bool:
        value = self._call("read", self.cache.get, key)
        return isinstance(value, dict) and value.get("token") == token

    def _count(self, name: str) -> int:
        counter = self._key(name) + ":fence"
        for _ in range(3):
            self._call("count", self.cache.add, counter, 0, None)  # no timeout: kept
            try:
                return int(self.cache.incr(counter))
            except ValueError:  # evicted between the two: add it again
                continue
            except Exception as e:  # each cache client raises its own errors
                raise LockIOError(f"Cache {self.alias!r} failed to count a token: {e}") from e
        raise LockIOError(f"Cache {self.alias!r} keeps dropping the fencing count of {name!r}.")

    def inspect(self, name: str) -> list[LockInfo]:
        value = self._call("read", self.cache.get, self._key(name))
        return [] if value is None else self._holders(name, value)

    def _holders(self, name: str, value: object) -> list[LockInfo]:
        """The holders the entry ``value`` of ``name`` stands for: a plain lock's holder, or
        each held slot of the semaphore whose header it is."""
        slots = header_slots(value)
        if slots is None:
            return [_info(name, value)]
        return [_info(name, slot) for _, slot in sorted(self._slots(name, slots).items())]

    def list(self) -> Iterator[LockInfo]:
        index = self._call("read", self.cache.get, self._index)
        if not isinstance(index, dict):  # none yet, or not one this code wrote
            index = {}
        found = self._call("read", self.cache.get_many, list(index))
        if len(found) < len(index):  # released, or expired: prune them
            self._update_index(keep=set(found))
        for key, name in sorted(index.items(), key=lambda item: item[1]):
            if key in found:
                yield from self._holders(name, found[key])

    def force_release(self, name: str, token: str | None = None) -> bool:
        main = self._key(name)
        slots = header_slots(self._call("read", self.cache.get, main))
        if slots is not None:  # a semaphore's header: its slots
            if token is not None:
                info = LockInfo(name, self.strategy, mode="semaphore", max_holders=slots)
                return self._release_slot(Lease(name, token, info))
            held = list(self._slots(name, slots))
            self._call("release", self.cache.delete_many, [*held, main])
            return True
        # With a token, compare then delete as release does (the window described above).
        if token is not None and not self._owned(name, token):
            return False
        return bool(self._call("release", self.cache.delete, self._key(name)))

    def _update_index(self, add: str | None = None, keep: set[str] | None = None) -> None:
        """Add a name to the index, or keep only the keys in ``keep``. Best effort (get,
        change, set): a concurrent update from another process may drop a name, and a failure
        here never fails the lock operation itself."""
        with _index_lock:
            try:
                index: dict[str, str] = self.cache.get(self._index) or {}
                if add is not None and keep is None and index.get(self._key(add)) == add:
                    return  # there already: nothing to write
                if add is not None:
                    index[self._key(add)] = add
                if keep is not None:
                    index = {key: name for key, name in index.items() if key in keep}
                self.cache.set(self._index, index, None)
            except Exception as e:
                logger.warning("Could not update the lock index in cache %r: %s", self.alias, e)


def _info(name: str, value: object) -> LockInfo:
    if not isinstance(value, dict):
        return LockInfo(name=name, strategy=CacheBackend.strategy)
    info = LockInfo.from_dict(name, CacheBackend.strategy, value.get("record"))
    token = value.get("token")
    # touch() renews without rewriting the value: the recorded expiry is out of date, so none.
    return replace(info, token=token if isinstance(token, str) else None, expires_at=None)
