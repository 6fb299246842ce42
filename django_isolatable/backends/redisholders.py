"""How the redis strategy keeps a name's holders: its keys, the Lua scripts that take, renew
and release them, and the ``Semaphore`` and ``Shared`` abilities.

A plain holder is the lock key's value, ``"<token> <record>"``. A group of holders (semaphore
slots, or shared holds) puts a marker in the lock key instead (``"= semaphore 3"``,
``"= shared"``), keeps each holder's record in a hash (token -> record) and its lease end in a
sorted set (token -> milliseconds on the server's ``TIME``), and gives the three keys the
longest lease's end as their expiry. A plain ``SET NX`` fails on the marker as on any holder, so
a plain take stays one command; a script that meets a group first drops the holders whose lease
ended. A waiting exclusive locker adds itself to a sorted set of waiters (token -> the end of
its mark), which new shared holds wait behind.

Every key of a name is made by ``name_keys`` from one base (``RedisBackend._base``: in a
cluster it ends with the name's hash tag), so a script can use them all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from django_isolatable.backends.base import (
    Fencing,
    Lease,
    Semaphore,
    Shared,
    WakeUps,
    holder_count_mismatch,
)
from django_isolatable.backends.redisreplicas import ReplicaAcks
from django_isolatable.backends.redisscripts import (
    LONGEST_BLOCK,
    NameKeys,
    Scripts,
)
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo

if TYPE_CHECKING:
    pass


class RedisHolders(ReplicaAcks, Semaphore, Shared, WakeUps, Fencing):
    """The redis backend's semaphore slots and shared holds (one script each), their waits,
    and fencing tokens."""

    if TYPE_CHECKING:
        strategy: ClassVar[str]
        client: Any  # redis.Redis, or redis.cluster.RedisCluster
        cluster: bool
        replica_acks: int
        scripts: Scripts

        def _base(self, name: str) -> bytes: ...
        def _keys(self, name: str) -> NameKeys: ...
        def _ttl_ms(self) -> int: ...
        def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any: ...

    def acquire_slot(self, name: str, info: LockInfo, max_holders: int) -> Lease | None:
        marker = f"= semaphore {max_holders:d}"
        args = (*self._holder(info), marker, max_holders)
        taken, lease = self._take(self.scripts.take_slot, name, info, args)
        if taken < 0:
            raise holder_count_mismatch(name, -taken, max_holders)
        return lease if taken else None

    def acquire_shared(self, name: str, info: LockInfo) -> Lease | None:
        taken, lease = self._take(self.scripts.take_shared, name, info, self._holder(info))
        return lease if taken else None

    def wait_for_release(self, name: str, timeout: float) -> None:
        """Block on the name's wake-up list, which a release, and a take that leaves room for
        another holder, push onto: an element pushed before this call returns it at once."""
        block = round(max(min(timeout, LONGEST_BLOCK), 0.001), 3)  # BLPOP 0 is forever
        self._call("wait", self.client.blpop, [self._keys(name).wake], timeout=block)

    def fencing_token(self, lease: Lease) -> int | None:
        keys = self._keys(lease.name)
        counter = self._base(lease.name) + b"fence:" + lease.name.encode("utf-8", "surrogatepass")
        record = lease.info.fenced_json_prefix().encode("utf-8", "surrogatepass")
        what, owner = "issue a fencing token", (f"{lease.token} ".encode(), record)
        if not self.replica_acks:
            token = self._call(what, self.scripts.fence, [*keys, counter], owner)
            return int(token) or None
        # A token no replica has could be issued again by the master that replaces this one.
        replicated = (
            self.client,
            self.scripts.fence,
            [*keys, counter],
            owner,
            self.replica_wait_ms,
        )
        token, confirmed = self._call(what, self._replicated, *replicated)
        if token and confirmed < self.replica_acks:
            raise LockIOError(self._unconfirmed("the fencing token of", lease.name, confirmed))
        return int(token) or None

    def _holder(self, info: LockInfo) -> tuple[bytes, bytes, int]:
        record = info.to_json().encode("utf-8", "surrogatepass")
        return (info.token or "").encode(), record, self._ttl_ms()

    def _group_records(self, names: list[str]) -> Iterator[LockInfo]:
        """The holders of the groups ``names`` whose lease has not ended; ``expires_at`` is the
        lease end on the server's clock (the same in every read until a renewal)."""
        pipeline = self.client.pipeline(transaction=False)
        for name in names:
            keys = self._keys(name)
            pipeline.hgetall(keys.holders)
            pipeline.zrange(keys.ends, 0, -1, withscores=True)
        if self.cluster:  # a cluster's pipeline has no TIME: asked apart, one more round trip
            replies = self._call("read", pipeline.execute)
            seconds, microseconds = self._call("read the time", self.client.time)
        else:
            pipeline.time()
            *replies, (seconds, microseconds) = self._call("read", pipeline.execute)
        now_ms = seconds * 1000 + microseconds // 1000
        for name, records, ends in zip(names, replies[::2], replies[1::2], strict=True):
            for token, ended in ends:
                record = records.get(token)
                if record is None or ended < now_ms:
                    continue  # released between the two reads, or its lease ended
                text = record.decode("utf-8", "replace")
                info = LockInfo.from_json(name, self.strategy, text) or LockInfo(
                    name, self.strategy
                )
                expires_at = datetime.fromtimestamp(ended / 1000, timezone.utc)
                yield replace(info, token=token.decode(), expires_at=expires_at)
