"""The redis strategy: ``SET key "<token> <record>" NX PX ttl``, renewed by a heartbeat.

The holder's record lives in the lock key's own value, after the owner token, so it has the
lock's expiry by construction and one ``SET`` takes the lock and records the holder. Release and
renewal are Lua compare-and-delete / compare-and-pexpire on the token: a holder never touches a
lock that is no longer its own. A release pushes onto a per-name wake-up list that waiters block
on with ``BLPOP`` (FIFO, like python-redis-lock), so handoff does not wait for a poll; a waiter's
take is queued behind its ``BLPOP``, so the lock passes to it with no round trip in between.

The lock's own commands are written, and their replies read, by this module on a connection
redis-py made (which connected, authenticated and said HELLO): redis-py's per-command layers
cost more CPU than the round trip's system calls.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from django.core.checks import CheckMessage, Error

from django_isolatable.backends.base import Backend, BackendOptions, Lease, missing_driver
from django_isolatable.errors import LockIOError
from django_isolatable.holders import (
    LockInfo,
    from_epoch_microseconds,
    new_record,
    stamped,
    utcnow,
)

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
#: A wake-up nobody consumed is dropped after this long.
WAKE_TTL_MS = 5000

_COMPARE = (
    "local v = redis.call('get', KEYS[1]) if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then "
)
# One wake-up token at most: a token nobody took yet wakes the next waiter all the same, so
# releasing with nobody waiting (the token of the last release still there) writes only the DEL.
RELEASE = _COMPARE + (
    "redis.call('del', KEYS[1]) if redis.call('llen', KEYS[2]) == 0 then "
    "redis.call('lpush', KEYS[2], 1) redis.call('pexpire', KEYS[2], ARGV[2]) end "
    "return 1 end return 0"
)
REFRESH = _COMPARE + "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
# Sent right behind a waiter's BLPOP on the same connection, so the server runs it the moment
# the BLPOP is served: a woken waiter takes the lock with no round trip after the release, ahead
# of the releasing process coming back for it. The value carries the server's time (µs) the
# lock was taken, which readers use for acquired_at: the record was made before the wait.
TAKE = (
    "local t = redis.call('time') local us = t[1] .. string.format('%06d', t[2]) "
    "if redis.call('set', KEYS[1], ARGV[1] .. ' ' .. us .. ' ' .. ARGV[3], 'NX', 'PX', ARGV[2]) "
    "then if KEYS[2] then redis.call('lpush', KEYS[2], 1) "
    "redis.call('pexpire', KEYS[2], ARGV[4]) end return us end return false"
)
FORCE_RELEASE = (
    "local n = redis.call('del', KEYS[1]) redis.call('del', KEYS[2]) "
    "redis.call('lpush', KEYS[2], 1) redis.call('pexpire', KEYS[2], ARGV[1]) return n"
)

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()
# What a wait took, by (url, key, thread), for that thread's next acquire of the key, which
# follows at once; with the monotonic time it was taken.
_taken: dict[tuple[str, bytes, int], tuple[LockInfo, float]] = {}
#: A take older than this was never claimed (its thread was interrupted right after the wait):
#: it is released, not handed out, since its lease was never renewed.
TAKEN_FRESH_FOR = 1.0
os.register_at_fork(after_in_child=_taken.clear)
_take_loaded: set[str] = set()  # URLs whose server was sent TAKE by this process


class _ThreadConnections(threading.local):
    """Each thread's own connection per URL, for the lock's commands: the lock's owner and the
    renewal thread never share one, and no command waits for the pool."""

    def __init__(self) -> None:
        self.connections: dict[str, Any] = {}


_this_thread = _ThreadConnections()


def _forget_connections_after_fork() -> None:
    # The child must not talk on the parent's sockets; dropping the objects only closes its
    # copies of the descriptors (redis-py shuts a socket down only in the process that made it).
    global _this_thread
    _this_thread = _ThreadConnections()


os.register_at_fork(after_in_child=_forget_connections_after_fork)


def safe_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process; redis-py resets pools after fork."""
    with _clients_lock:
        if url not in _clients:
            import redis

            _clients[url] = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=CONNECT_TIMEOUT * 2,
                health_check_interval=30,
                retry=None,
            )
        return _clients[url]


class RedisBackend(Backend):
    strategy: ClassVar[str] = "redis"
    expiring: ClassVar[bool] = True
    heartbeat: ClassVar[bool] = True
    queued_wait: ClassVar[bool] = True
    wait_takes_lock: ClassVar[bool] = True
    # Releases wake waiters through BLPOP; a holder that died does not, so this is how soon a
    # waiter on its host looks at it (and takes the lock over).
    poll_interval: ClassVar[float] = 0.2

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.url = options.redis_url
        import redis.exceptions  # the driver is imported only by this strategy, when it is used

        self._errors = redis.exceptions
        self.client = _client(self.url)
        self._prefix = f"{options.key_prefix}isolatable:".encode("utf-8", "surrogatepass")
        self._key_cache: dict[str, tuple[bytes, bytes]] = {}  # by name: (lock key, wake list)
        self._release = self.client.register_script(RELEASE)
        self._refresh = self.client.register_script(REFRESH)
        self._force_release = self.client.register_script(FORCE_RELEASE)
        self._take = self.client.register_script(TAKE)

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        missing = missing_driver("redis", "redis", "redis", "isolatable.E020")
        if missing:
            return missing
        if urlsplit(options.redis_url).scheme not in ("redis", "rediss", "unix"):
            return [
                Error(
                    f'settings.ISOLATABLE["REDIS_URL"] is {safe_url(options.redis_url)!r}; use a '
                    "redis://, rediss:// or unix:// URL.",
                    id="isolatable.E021",
                )
            ]
        return []

    def _keys(self, name: str) -> tuple[bytes, bytes]:
        keys = self._key_cache.get(name)
        if keys is None:
            encoded = name.encode("utf-8", "surrogatepass")
            keys = (self._prefix + b"lock:" + encoded, self._prefix + b"wake:" + encoded)
            if len(self._key_cache) > 256:
                self._key_cache.clear()
            self._key_cache[name] = keys
        return keys

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except self._errors.ConnectionError as e:
            raise LockIOError(
                f"Redis at {safe_url(self.url)} is unreachable ({e}); check that it runs and "
                'settings.ISOLATABLE["REDIS_URL"].'
            ) from e
        except self._errors.RedisError as e:
            raise self._failure(what, e) from e

    def _failure(self, what: str, error: Exception) -> LockIOError:
        return LockIOError(f"Redis at {safe_url(self.url)} failed to {what}: {error}.")

    def _checked(self, what: str, reply: Any) -> Any:
        """``reply``, unless it is an error reply: then ``LockIOError``."""
        if isinstance(reply, Exception):
            raise self._failure(what, reply) from reply
        return reply

    def _send(self, what: str, *commands: tuple[Any, ...]) -> list[Any]:
        """The replies to ``commands``, sent in one write on this thread's connection; an error
        reply is returned as its ``ResponseError``, once every reply was read.

        What a redis-py pipeline does, without the client's bookkeeping around each command
        (taking a pooled connection and giving it back alone is 11 µs of CPU) or its writer
        and reader (``_pack``, ``_read_replies``): these are the lock's hot path. A connection
        that fails is disconnected, and reconnects on next use; a socket error or timeout is a
        ``ConnectionError``. The connection is this thread's own, outside the pool, so it is
        dropped, and closed, with the thread.
        """
        return self._call(what, self._exchange, commands)  # type: ignore[no-any-return]

    def _exchange(self, commands: tuple[tuple[Any, ...], ...]) -> list[Any]:
        connection = _this_thread.connections.get(self.url)
        if connection is None:  # made as the pool makes its own; it closes with its thread
            pool = self.client.connection_pool
            connection = pool.connection_class(**pool.connection_kwargs)
            _this_thread.connections[self.url] = connection
        elif (sock := getattr(connection, "_sock", None)) is not None:
            # What the pool checks before handing a connection out: one the server closed
            # meanwhile (a restart, its idle timeout) reconnects instead of failing the command.
            # Every reply of the last exchange was read, so the socket is readable only if the
            # server closed it or sent something since (a TLS session ticket, say): one select,
            # and only then the client's can_read(), which takes three system calls, decides.
            try:
                stale = bool(select.select((sock,), (), (), 0)[0]) and connection.can_read()
            except (self._errors.ConnectionError, OSError, ValueError):
                stale = True
            if stale:
                connection.disconnect()
        try:
            if connection._sock is None:
                connection.connect()  # authenticates, selects the database, says HELLO
            sock = connection._sock
            sock.sendall(_pack(commands))
            return _read_replies(sock, len(commands), connection._parser.parse_error)
        except OSError as e:  # the socket's timeout included
            connection.disconnect()
            raise self._errors.ConnectionError(str(e) or type(e).__name__) from e
        except BaseException:
            connection.disconnect()  # a reply may still be on its way: never read it as ours
            raise

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        key, _ = self._keys(name)
        taken = _taken.pop((self.url, key, threading.get_ident()), None)
        if taken is not None:  # the wait took it
            record, when = taken
            lease = Lease(name=name, token=record.token or "", info=record)
            if time.monotonic() - when < TAKEN_FRESH_FOR:
                return lease
            self.release(lease)
        token = info.token or ""
        value = f"{token} {info.to_json()}".encode()
        ttl_ms = max(1, int(self.options.ttl * 1000))
        (reply,) = self._send("lock", ("SET", key, value, "NX", "PX", ttl_ms))
        if self._checked("lock", reply) is None:
            return None
        return Lease(name=name, token=token, info=info)

    def release(self, lease: Lease) -> bool:
        if lease.pid != os.getpid():
            return False  # a forked child's copy: the lock is its parent's
        keys = self._keys(lease.name)
        owner = f"{lease.token} ".encode()
        return bool(self._script("release", self._release, keys, owner, WAKE_TTL_MS))

    def _script(self, what: str, script: Any, keys: tuple[bytes, ...], *args: Any) -> Any:
        """Run a registered Lua script by its SHA, loading it if the server does not have it."""
        (reply,) = self._send(what, ("EVALSHA", script.sha, len(keys), *keys, *args))
        if isinstance(reply, self._errors.NoScriptError):  # a restarted or flushed server
            return self._call(what, script, keys=keys, args=args)
        return self._checked(what, reply)

    def refresh(self, lease: Lease, ttl: float) -> bool:
        key, _ = self._keys(lease.name)
        owner = f"{lease.token} ".encode()
        ttl_ms = max(1, int(ttl * 1000))
        return bool(self._script("renew", self._refresh, (key,), owner, ttl_ms))

    def _records(self, keys: list[bytes]) -> Iterator[LockInfo]:
        pipeline = self.client.pipeline(transaction=False)
        for key in keys:
            pipeline.get(key)
            pipeline.pttl(key)
        replies = self._call("read", pipeline.execute)
        now = utcnow()
        for key, value, pttl in zip(keys, replies[::2], replies[1::2], strict=True):
            if value is None:
                continue  # released between SCAN and GET
            name = key[len(self._prefix) + len(b"lock:") :].decode("utf-8", "surrogatepass")
            token, _, record = value.decode("utf-8", "replace").partition(" ")
            taken_at, _, rest = record.partition(" ")
            record = rest if taken_at.isdigit() else record  # a waiter's: the server's time
            info = LockInfo.from_json(name, self.strategy, record) or LockInfo(name, self.strategy)
            expires_at = now + timedelta(milliseconds=pttl) if pttl >= 0 else None
            if taken_at.isdigit():
                info = replace(info, acquired_at=from_epoch_microseconds(taken_at))
            yield replace(info, token=token, expires_at=expires_at)

    def inspect(self, name: str) -> LockInfo | None:
        key, _ = self._keys(name)
        return next(self._records([key]), None)

    def list(self) -> Iterator[LockInfo]:
        pattern = _glob_escape(self._prefix + b"lock:") + b"*"
        keys = self._call("list locks", lambda: list(self.client.scan_iter(pattern, count=500)))
        yield from self._records(sorted(keys))

    def force_release(self, name: str) -> bool:
        keys = self._keys(name)
        return bool(self._script("release", self._force_release, keys, WAKE_TTL_MS))

    def wait(self, name: str, timeout: float) -> None:
        """Take the lock if it is free, else BLPOP the wake-up list with TAKE right behind it,
        in one exchange: free at once, or woken (or timed out) on a free lock, this thread
        holds it, and its next ``acquire`` returns it (``wait_takes_lock``).

        A first TAKE that succeeds pushes onto this wait's own list, which the BLPOP names
        first, so it returns at once; the TAKE behind it then finds the lock held (by this
        thread) and does nothing.
        """
        key, wake = self._keys(name)
        seconds = max(timeout, 0.001)  # BLPOP treats 0 as "forever"
        if self.url not in _take_loaded:  # else the first wake-up on a new server is wasted
            self._call("load a script", self.client.script_load, TAKE)
            _take_loaded.add(self.url)
        record = new_record(name, self.strategy, ttl=self.options.ttl)
        token = record.token or ""
        ttl_ms = max(1, int(self.options.ttl * 1000))
        json = record.to_json()
        mine = self._prefix + b"taken:" + token.encode()
        replies = self._send(
            "wait",
            ("EVALSHA", self._take.sha, 2, key, mine, token, ttl_ms, json, WAKE_TTL_MS),
            ("BLPOP", mine, wake, seconds),
            ("EVALSHA", self._take.sha, 1, key, token, ttl_ms, json),
        )
        # A restarted or flushed server answers NOSCRIPT; the other TAKE may still have run
        # (another process can load the script during the BLPOP). Load it once for next time.
        taken_at, flushed = None, False
        for reply in replies[::2]:
            if isinstance(reply, self._errors.NoScriptError):
                flushed = True
            else:
                taken_at = self._checked("wait", reply) or taken_at
        if flushed:
            self._call("load a script", self.client.script_load, TAKE)
        if taken_at:  # the server's time it was taken, in µs
            microseconds = taken_at.decode() if isinstance(taken_at, bytes) else str(taken_at)
            taken = from_epoch_microseconds(microseconds) or utcnow()
            record = stamped(record, token, taken, ttl=self.options.ttl)
            _taken[(self.url, key, threading.get_ident())] = (record, time.monotonic())


def _pack(commands: tuple[tuple[Any, ...], ...]) -> bytes:
    """``commands`` in the Redis protocol: what ``Connection.pack_commands`` makes of the lock's
    own arguments (bytes, str, int, float), at under half its cost."""
    parts = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for argument in command:
            if not isinstance(argument, bytes):
                text = argument if isinstance(argument, str) else repr(argument)
                argument = text.encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(argument), argument))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def _read_replies(sock: Any, count: int, parse_error: Any) -> list[Any]:
    """The next ``count`` replies on ``sock``: an error reply as its exception (made by the
    client's own ``parse_error``, so NOSCRIPT is a ``NoScriptError``), not raised.

    redis-py's reader took 53 µs of CPU for the four replies of a waiting lock and its release
    (a buffer object, several calls per line, the recv calls); a lock's exchange has one to
    three short replies, read here in one or two ``recv`` calls. RESP2 and RESP3 alike: what
    SET, EVALSHA and BLPOP answer.
    """
    data = sock.recv(65536)
    while True:
        if not data:
            raise ConnectionError("Connection closed by server.")
        try:
            replies, position = [], 0
            for _ in range(count):
                reply, position = _parse(data, position, parse_error)
                replies.append(reply)
        except ValueError as e:  # a length or number that is none
            raise _protocol_error(str(e)) from e
        except _Incomplete:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("Connection closed by server.") from None
            data += more
            continue
        if position != len(data):
            raise _protocol_error(f"{len(data) - position} bytes after the last reply")
        return replies


def _parse(data: bytes, position: int, parse_error: Any) -> tuple[Any, int]:
    end = data.find(b"\r\n", position)
    if end < 0:
        raise _Incomplete
    kind, line, position = data[position : position + 1], data[position + 1 : end], end + 2
    if kind == b"$" or kind == b"!" or kind == b"=":  # bulk, RESP3 blob error, verbatim
        size = int(line)
        if size < 0:
            return None, position
        if len(data) < position + size + 2:
            raise _Incomplete
        value = data[position : position + size]
        position += size + 2
        if kind == b"!":
            return parse_error(value.decode("utf-8", "replace")), position
        return (value[4:] if kind == b"=" else value), position
    if kind == b":":
        return int(line), position
    if kind == b"+":
        return line, position
    if kind == b"-":
        return parse_error(line.decode("utf-8", "replace")), position
    if kind == b"*":
        size = int(line)
        if size < 0:
            return None, position
        items = []
        for _ in range(size):
            item, position = _parse(data, position, parse_error)
            items.append(item)
        return items, position
    if kind == b"_":
        return None, position
    if kind == b"#":
        return line == b"t", position
    if kind == b",":
        return float(line), position
    raise _protocol_error(f"unexpected reply type {kind!r}")


def _protocol_error(what: str) -> Exception:
    import redis.exceptions

    return redis.exceptions.InvalidResponse(f"Protocol error: {what}")


def _glob_escape(pattern: bytes) -> bytes:
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        pattern = pattern.replace(special, b"\\" + special)
    return pattern
