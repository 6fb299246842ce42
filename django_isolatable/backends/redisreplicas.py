"""``REDIS_REPLICA_ACKS`` in the redis strategy: every take, renewal and fencing token is
followed by ``WAIT <acks> <ms>`` in the same pipeline (``WAIT`` cannot run inside a script),
so it costs no round trip of its own. ``WAIT`` answers how many replicas have every write the
connection made before it; a take fewer confirmed is released again and raises
``LockIOError``, a renewal raises it (the renewal is tried again, and the lease is reported
lost once its TTL ran out unconfirmed).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from django_isolatable.backends.base import Lease
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo

if TYPE_CHECKING:
    from redis.commands.core import Script

    from django_isolatable.backends.redisscripts import NameKeys

logger = logging.getLogger(__name__)

#: How long a take's ``WAIT`` gives the replicas to confirm it, in ms; a renewal's gives them
#: at most half its socket timeout. A replica in sync confirms in milliseconds: one that has not
#: in a second is down or far behind.
REPLICA_WAIT_MS = 1000


class ReplicaAcks:
    """The redis backend's ``WAIT`` after its writes (with ``replica_acks`` above 0)."""

    replica_wait_ms: ClassVar[int] = REPLICA_WAIT_MS

    if TYPE_CHECKING:
        client: Any
        cluster: bool
        replica_acks: int
        _where: str
        _errors: Any

        def _keys(self, name: str) -> NameKeys: ...
        def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any: ...
        def release(self, lease: Lease) -> bool: ...

    def _wait_for_replicas(self, pipeline: Any, client: Any, key: bytes, wait_ms: int) -> None:
        """Queue ``WAIT`` on ``pipeline`` (of ``client``), on the connection of ``key``'s
        server: it answers how many replicas have the writes queued before it."""
        if self.cluster:  # a cluster sends a command without keys to every master otherwise
            node = client.get_node_from_key(key)
            pipeline.wait(self.replica_acks, wait_ms, target_nodes=node)
        else:
            pipeline.wait(self.replica_acks, wait_ms)

    def _replicated(
        self, client: Any, script: Script, keys: list[bytes], args: tuple[Any, ...], wait_ms: int
    ) -> tuple[Any, int]:
        """``script``'s reply and how many replicas confirmed it: one pipeline of ``EVALSHA``
        and ``WAIT`` (``WAIT`` cannot run inside a script), the script loaded again after a
        ``NOSCRIPT``."""
        for attempt in range(2):
            pipeline = client.pipeline(transaction=False)
            pipeline.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            self._wait_for_replicas(pipeline, client, keys[0], wait_ms)
            reply, confirmed = pipeline.execute(raise_on_error=False)
            if attempt == 0 and isinstance(reply, self._errors.NoScriptError):
                client.script_load(script.script)
                continue
            for answer in (reply, confirmed):
                if isinstance(answer, Exception):
                    raise answer
            return reply, int(confirmed)
        raise AssertionError("unreachable")  # pragma: no cover

    def _take(
        self, script: Script, name: str, info: LockInfo, args: tuple[Any, ...]
    ) -> tuple[int, Lease]:
        """A take script's reply (above 0: taken) and the lease it took; with
        ``REDIS_REPLICA_ACKS``, a take fewer replicas confirmed is released again and raises
        ``LockIOError``."""
        lease = Lease(name=name, token=info.token or "", info=info)
        keys = list(self._keys(name))
        if not self.replica_acks:
            return int(self._call("lock", script, keys, args)), lease
        replicated = (self.client, script, keys, args, self.replica_wait_ms)
        taken, confirmed = self._call("lock", self._replicated, *replicated)
        if taken > 0:
            self._confirmed(lease, confirmed)
        return int(taken), lease

    def _confirmed(self, lease: Lease, confirmed: int) -> None:
        """Nothing when enough replicas confirmed ``lease``'s take; else it is released (a
        lock no replica has could be lost in a failover) and ``LockIOError`` raised."""
        if confirmed >= self.replica_acks:
            return
        try:
            self.release(lease)
        except Exception as e:  # the missing confirmation is what the caller must see
            why = (
                "Could not release lock %s, which too few replicas confirmed (its TTL frees it): %s"
            )
            logger.warning(why, lease.name, e)
        raise LockIOError(self._unconfirmed("lock", lease.name, confirmed) + " It was released.")

    def _unconfirmed(self, what: str, name: str, confirmed: int) -> str:
        return (
            f"Only {confirmed} replica(s) of {self._where} confirmed {what} {name} in time, "
            f'and settings.ISOLATABLE["REDIS_REPLICA_ACKS"] asks for {self.replica_acks}; '
            "check that the replicas run and are in sync."
        )
