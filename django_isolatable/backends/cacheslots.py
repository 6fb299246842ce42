"""The semaphore ability of the cache strategy: a cache entry per slot, taken with ``add()``.

While a semaphore of N has holders, the name's own entry (the one a plain lock takes) is the
semaphore's header: it records N, so a plain lock of the name fails while it is there, and
``inspect`` reads the N slot entries it names with one ``get_many``. Slot ``i`` is the entry
``<name's key>:slot:<i>``, taken with ``add()`` (atomic set-if-absent) and renewed with
``touch()``, the header renewed with it. The last holder to release deletes the header.

The cache has no operation on several entries at once, nor compare-and-delete: a slot taken
just as the last other holder deletes the header finds the header gone and adds it back, but a
plain lock taken in that same moment can hold the name beside that slot (the window of one
round trip that the cache strategy's release has too; see docs/cache-strategy.md). That is
why this strategy offers no shared locks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from django_isolatable.backends.base import Lease, Semaphore, holder_count_mismatch
from django_isolatable.holders import LockInfo, new_token

if TYPE_CHECKING:
    from django.core.cache import BaseCache

    from django_isolatable.backends.base import BackendOptions


@dataclass
class SlotLease(Lease):
    """A held slot: also the key of its cache entry."""

    key: str = ""


def header_slots(value: object) -> int | None:
    """N, if ``value`` is a semaphore's header entry; else None (a plain lock's, or none)."""
    if isinstance(value, dict) and isinstance(value.get("slots"), int):
        slots: int = value["slots"]
        return slots
    return None


class CacheSlots(Semaphore):
    """Mixin of the cache strategy's backend: semaphores as one cache entry per slot."""

    if TYPE_CHECKING:
        options: BackendOptions
        strategy: ClassVar[str]

        @property
        def cache(self) -> BaseCache: ...

        def _key(self, name: str) -> str: ...

        def _call(self, what: str, function: Any, *args: Any) -> Any: ...

        def _ttl(self, ttl: float) -> int: ...

        def _update_index(self, add: str | None = None, keep: set[str] | None = None) -> None: ...

    def _slot_keys(self, name: str, slots: int) -> list[str]:
        main = self._key(name)
        return [f"{main}:slot:{i}" for i in range(slots)]

    def _slots(self, name: str, slots: int) -> dict[str, Any]:
        """The held slots' entries of ``name``'s semaphore of ``slots``, by key."""
        found: dict[str, Any] = self._call(
            "read", self.cache.get_many, self._slot_keys(name, slots)
        )
        return found

    def _header(self, name: str, max_holders: int) -> bool:
        """Make sure ``name``'s header of ``max_holders`` is there, renewed. False when a plain
        lock holds the name; raises ``holder_count_mismatch`` when a header of another count
        with held slots is there."""
        main, ttl = self._key(name), self._ttl(self.options.ttl)
        header = {"slots": max_holders, "token": new_token()}
        for _ in range(3):
            current = self._call("read", self.cache.get, main)
            if current is None:
                if self._call("lock", self.cache.add, main, header, ttl):
                    return True
                continue  # made meanwhile: look at it
            recorded = header_slots(current)
            if recorded is None:
                record = current.get("record") if isinstance(current, dict) else None
                counted = LockInfo.from_dict(name, self.strategy, record).max_holders
                raise holder_count_mismatch(name, counted, max_holders)
            if recorded != max_holders:
                if self._slots(name, recorded):
                    raise holder_count_mismatch(name, recorded, max_holders)
                return False  # a header without slots: it goes with its TTL
            # Renewed, so that it outlives the slot taken now (its holder renews it too).
            if self._call("renew", self.cache.touch, main, ttl):
                return True
        return False  # it kept going as we looked

    def acquire_slot(self, name: str, info: LockInfo, max_holders: int) -> Lease | None:
        if not self._header(name, max_holders):
            return None
        held = self._slots(name, max_holders)
        value = {"token": info.token, "record": info.to_dict()}
        ttl = self._ttl(self.options.ttl)
        for key in self._slot_keys(name, max_holders):
            if key in held or not self._call("lock", self.cache.add, key, value, ttl):
                continue
            # The last other holder may have deleted the header meanwhile: put it back.
            try:
                current = self._call("read", self.cache.get, self._key(name))
                kept = header_slots(current) == max_holders or self._header(name, max_holders)
            except BaseException:
                self._delete_if_ours(key, info.token or "")
                raise
            if not kept:
                self._delete_if_ours(key, info.token or "")
                return None
            self._update_index(name)
            return SlotLease(name=name, token=info.token or "", info=info, key=key)
        return None

    def _delete_if_ours(self, key: str, token: str) -> bool:
        value = self._call("read", self.cache.get, key)
        if not (isinstance(value, dict) and value.get("token") == token):
            return False
        return bool(self._call("release", self.cache.delete, key))

    def _slot_key_of(self, name: str, token: str, slots: int) -> str | None:
        for key, value in self._slots(name, slots).items():
            if isinstance(value, dict) and value.get("token") == token:
                return key
        return None

    def _release_slot(self, lease: Lease) -> bool:
        """Release ``lease``'s slot (found by its token when the lease does not know its key),
        and the header with the last slot."""
        slots = lease.info.max_holders
        key = lease.key if isinstance(lease, SlotLease) else None
        key = key or self._slot_key_of(lease.name, lease.token, slots)
        if key is None or not self._delete_if_ours(key, lease.token):
            return False
        if not self._slots(lease.name, slots):
            main = self._key(lease.name)
            if header_slots(self._call("read", self.cache.get, main)) is not None:
                self._call("release", self.cache.delete, main)
                if self._slots(lease.name, slots):  # one was taken meanwhile: keep its header
                    self._header(lease.name, slots)
        return True

    def _refresh_slot(self, lease: Lease, ttl: float) -> bool:
        key = lease.key if isinstance(lease, SlotLease) else None
        key = key or self._slot_key_of(lease.name, lease.token, lease.info.max_holders)
        value = None if key is None else self._call("read", self.cache.get, key)
        if key is None or not (isinstance(value, dict) and value.get("token") == lease.token):
            return False
        main = self._key(lease.name)  # the header first: it must outlive every slot
        renewed = self._call("renew", self.cache.touch, main, self._ttl(ttl))
        if not renewed and not self._header(lease.name, lease.info.max_holders):
            return False
        return bool(self._call("renew", self.cache.touch, key, self._ttl(ttl)))
