"""The redis strategy: ``SET key "<token> <record>" NX PX ttl``, renewed by a heartbeat.

A lock key's value is the owner token, a space and the holder's record as JSON: one ``SET``
takes the lock and records the holder. Release and renewal are Lua compare-and-delete /
compare-and-pexpire on the token (redis-py ``Script`` objects, which reload on NOSCRIPT). A
release pushes onto a per-name wake-up list; a waiter's pipeline takes a free lock, else blocks
on that list with a take right behind: a release wakes the first waiter, and the server takes
the lock for it with no round trip in between. Semaphore slots and shared holds are kept as
``redisholders.py`` says. ``redisclients.py`` reaches the server, a Sentinel group's master or
a Redis Cluster; in a cluster every key of a name carries one hash tag made from the name, so
a script may use them all. With ``REDIS_REPLICA_ACKS`` every take and renewal is followed by
``WAIT`` in the same pipeline.

Everything goes through redis-py's public client API: its connection pools check the process id,
so a forked child never talks on its parent's connections.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any, ClassVar

from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured

from django_isolatable.backends.base import Backend, BackendOptions, Lease, Waiting, missing_driver
from django_isolatable.backends.periods import RedisPeriods
from django_isolatable.backends.redisclients import Topology, safe_url, url_problem
from django_isolatable.backends.redisclients import client as _client
from django_isolatable.backends.redisholders import RedisHolders
from django_isolatable.backends.redisscripts import (
    GROUP,
    LONGEST_BLOCK,
    TAKE,
    TAKE_WOKEN,
    WAITING_MARK_MS,
    NameKeys,
    Scripts,
    name_keys,
    register_scripts,
)
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, this_pid, utcnow

logger = logging.getLogger(__name__)

#: How long a command may take before it is a ``LockIOError`` (renewals: see ``refresh``).
COMMAND_TIMEOUT = 10.0
#: A renewal's socket timeout, as a fraction of the TTL: renewals run every TTL/3, so a renewal
#: that meets a server that stopped answering gives up well before the lease ends.
RENEWAL_TIMEOUT_SHARE = 0.25
#: The length of a cluster's hash tag, ``{`` 16 hex digits ``}``.
TAG_LENGTH = 18

DRIVER_MISSING = (
    "The redis strategy needs the redis package: pip install 'django-isolatable[redis]'."
)


@functools.cache
def _scripts(topology: Topology) -> Scripts:
    """The scripts, registered once per topology (each computes its SHA1)."""
    return register_scripts(_client(topology, COMMAND_TIMEOUT))


class RedisBackend(Backend, Waiting, RedisHolders, RedisPeriods):
    strategy: ClassVar[str] = "redis"
    expiring: ClassVar[bool] = True
    heartbeat: ClassVar[bool] = True

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.url = options.redis_url
        self.topology = Topology.of(options)
        self.cluster = options.redis_cluster
        self.replica_acks = options.redis_replica_acks
        try:  # the driver is imported only by this strategy, when it is used
            import redis.exceptions
        except ImportError as e:
            raise ImproperlyConfigured(DRIVER_MISSING) from e
        self._errors = redis.exceptions
        self._where = self.topology.describe(safe_url(self.url))
        # A cluster's client reads the slots from a node as it is made: it can fail here.
        self.client = self._call("connect", _client, self.topology, COMMAND_TIMEOUT)
        self.scripts = self._call("connect", _scripts, self.topology)
        self._prefix = f"{options.key_prefix}isolatable:".encode("utf-8", "surrogatepass")

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        missing = missing_driver("redis", "redis", "redis", "isolatable.E020")
        if missing:
            return missing
        problem = url_problem(options.redis_url)
        return [] if problem is None else [Error(problem[1], id=problem[0])]

    def store(self) -> str:
        return self.topology.store(safe_url(self.url))

    def _base(self, name: str) -> bytes:
        """What every key of ``name`` starts with: the prefix, and in a cluster a hash tag made
        from a hash of the prefix and the name (so braces in a name cannot change the slot)."""
        if not self.cluster:
            return self._prefix
        digest = hashlib.sha1(self._prefix + name.encode("utf-8", "surrogatepass"))
        return self._prefix + b"{" + digest.hexdigest()[:16].encode() + b"}"

    def _keys(self, name: str) -> NameKeys:
        return name_keys(self._base(name), name)

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, its redis-py errors as ``LockIOError``."""
        try:
            return function(*args, **kwargs)
        except self._errors.ConnectionError as e:
            raise LockIOError(
                f"{self._where} is unreachable ({safe_url(str(e))}); check that it runs and "
                f'settings.ISOLATABLE["{self.topology.setting}"].'
            ) from e
        except self._errors.TimeoutError as e:
            raise LockIOError(
                f"{self._where} did not answer in time to {what} "
                f"({safe_url(str(e))}); check that it runs and is reachable."
            ) from e
        except (self._errors.RedisError, self._errors.RedisClusterException) as e:
            raise LockIOError(f"{self._where} failed to {what}: {safe_url(str(e))}.") from e

    def _value(self, info: LockInfo) -> bytes:
        return f"{info.token or ''} {info.to_json()}".encode("utf-8", "surrogatepass")

    def _ttl_ms(self) -> int:
        return max(1, int(self.options.ttl * 1000))

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        key = self._base(name) + b"lock:" + name.encode("utf-8", "surrogatepass")  # NameKeys.lock
        value = self._value(info)
        if not self.replica_acks:
            if not self._call("lock", self.client.set, key, value, nx=True, px=self._ttl_ms()):
                return None
            return Lease(name=name, token=info.token or "", info=info)
        pipeline = self.client.pipeline(transaction=False)
        pipeline.set(key, value, nx=True, px=self._ttl_ms())
        self._wait_for_replicas(pipeline, self.client, key, self.replica_wait_ms)
        taken, confirmed = self._call("lock", pipeline.execute)
        if not taken:
            return None
        lease = Lease(name=name, token=info.token or "", info=info)
        self._confirmed(lease, confirmed)
        return lease

    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        """One pipeline: take the lock if it is free, else block on the wake-up list with the
        take right behind, so a release wakes the first waiter and the server takes the lock
        for it at once. While it waits, it is marked waiting, which holds off new shared holds
        (writer preference). Interrupted (an error, ``KeyboardInterrupt``, a signal handler's
        exception), it releases by its token what the server may have taken."""
        keys = self._keys(name)
        value, deadline = self._value(info), time.monotonic() + timeout
        lease = Lease(name=name, token=info.token or "", info=info)
        took = self._base(name) + b"took:" + lease.token.encode()  # this waiter's own wake-up
        acks = self.replica_acks
        try:
            while (left := deadline - time.monotonic()) > 0:
                block = round(max(min(left, LONGEST_BLOCK), 0.001), 3)  # BLPOP 0: forever
                mark = int(block * 1000) + WAITING_MARK_MS
                args = (value, self._ttl_ms(), lease.token)
                # EVAL through execute_command: a cluster's pipeline has no eval() of this kind.
                pipeline = self.client.pipeline(transaction=False)
                pipeline.execute_command("EVAL", TAKE, 6, *keys, took, *args, mark)
                if acks:
                    self._wait_for_replicas(pipeline, self.client, keys.lock, self.replica_wait_ms)
                pipeline.blpop([took, keys.wake], timeout=block)
                pipeline.execute_command("EVAL", TAKE_WOKEN, 5, *keys, *args)
                if acks:
                    self._wait_for_replicas(pipeline, self.client, keys.lock, self.replica_wait_ms)
                replies = self._call("wait", pipeline.execute)
                if not acks and (replies[0] or replies[2]):  # taken free, or woken
                    return lease
                for taken, confirmed in (replies[0:2], replies[3:5]) if acks else ():
                    if taken:
                        self._confirmed(lease, confirmed)  # too few replicas: released, raises
                        return lease
            return None
        except BaseException:
            self._release_interrupted(lease)
            raise

    def _release_interrupted(self, lease: Lease) -> None:
        """Release what an interrupted wait may have taken, without hiding why it stopped."""
        try:
            if self.release(lease):
                logger.debug("Released lock %s, taken by a wait that was interrupted", lease.name)
        except Exception as e:  # the interruption is what the caller must see
            why = "Could not release lock %s after an interrupted wait (its TTL frees it): %s"
            logger.warning(why, lease.name, e)

    def release(self, lease: Lease) -> bool:
        if lease.pid != this_pid():
            return False  # a forked child's copy: the lock is its parent's
        return self._release_by(lease.name, f"{lease.token} ".encode())

    def force_release(self, name: str, token: str | None = None) -> bool:
        return self._release_by(name, b"" if token is None else f"{token} ".encode())

    def _release_by(self, name: str, owner: bytes) -> bool:
        keys = self._keys(name)
        return bool(self._call("release", self.scripts.release, keys, (owner,)))

    def refresh(self, lease: Lease, ttl: float) -> bool:
        """Renew on a client whose socket timeout is a share of ``ttl``: a server that stopped
        answering (a network black hole) makes this raise ``LockIOError`` well within the
        time left on the lease, not after ``COMMAND_TIMEOUT``. A renewal fewer replicas
        confirmed than ``REDIS_REPLICA_ACKS`` raises ``LockIOError`` too: it is tried again,
        and the lease is reported lost once its TTL ran out unconfirmed."""
        keys = self._keys(lease.name)
        timeout = max(0.01, round(ttl * RENEWAL_TIMEOUT_SHARE, 3))
        client = self._call("connect", _client, self.topology, timeout)
        args = (f"{lease.token} ".encode(), max(1, int(ttl * 1000)))
        if not self.replica_acks:
            return bool(self._call("renew", self.scripts.refresh, keys, args, client))
        wait_ms = max(1, min(self.replica_wait_ms, int(timeout * 500)))
        replies = self._call(
            "renew", self._replicated, client, self.scripts.refresh, keys, args, wait_ms
        )
        renewed, confirmed = replies
        if renewed and confirmed < self.replica_acks:
            raise LockIOError(self._unconfirmed("the renewal of lock", lease.name, confirmed))
        return bool(renewed)

    def _records(self, keys: list[bytes]) -> Iterator[LockInfo]:
        """The holders of the names whose lock keys are ``keys``: the plain holders read with
        one pipeline, the groups' holders with a second one."""
        pipeline = self.client.pipeline(transaction=False)
        for key in keys:
            pipeline.get(key)
            pipeline.pttl(key)
        replies = self._call("read", pipeline.execute)
        now, groups = utcnow(), []
        for key, value, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if value is None:
                continue  # released between SCAN and GET
            name = key[self._name_starts :].decode("utf-8", "surrogatepass")
            if value.startswith(GROUP):
                groups.append(name)
                continue
            token, _, record = value.decode("utf-8", "replace").partition(" ")
            info = LockInfo.from_json(name, self.strategy, record) or LockInfo(name, self.strategy)
            expires_at = now + timedelta(milliseconds=pttl) if pttl >= 0 else None
            yield replace(info, token=token, expires_at=expires_at)
        if groups:
            yield from self._group_records(groups)

    def inspect(self, name: str) -> list[LockInfo]:
        return list(self._records([self._keys(name).lock]))

    @property
    def _name_starts(self) -> int:
        """Where the name starts in a lock key."""
        return len(self._prefix) + (TAG_LENGTH if self.cluster else 0) + len(b"lock:")

    def list(self) -> Iterator[LockInfo]:
        """Every holder, from every master of a cluster."""
        tag = b"{" + b"?" * (TAG_LENGTH - 2) + b"}" if self.cluster else b""
        pattern = _glob_escape(self._prefix) + tag + b"lock:*"
        # A cluster's SCAN of every master is asked for by name; one Redis has no such option.
        where = {"target_nodes": self.client.PRIMARIES} if self.cluster else {}
        batch: list[bytes] = []
        keys = self.client.scan_iter(pattern, count=500, **where)
        for key in self._each("list locks", keys):
            batch.append(key)
            if len(batch) == 500:
                yield from self._records(batch)
                batch = []
        yield from self._records(batch)

    def _each(self, what: str, items: Iterable[bytes]) -> Iterator[bytes]:
        """``items``, a redis-py generator whose errors are raised as ``LockIOError``."""
        iterator = iter(items)
        while True:
            item = self._call(what, next, iterator, None)
            if item is None:
                return
            yield item


def _glob_escape(pattern: bytes) -> bytes:
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        pattern = pattern.replace(special, b"\\" + special)
    return pattern
