"""The redis strategy: ``SET key "<token> <record>" NX PX ttl``, renewed by a heartbeat.

A lock key's value is the owner token, a space and the holder's record as JSON: one ``SET``
takes the lock and records the holder. Release and renewal are Lua compare-and-delete /
compare-and-pexpire on the token (redis-py ``Script`` objects, which reload on NOSCRIPT). A
release pushes onto a per-name wake-up list; a waiter's pipeline takes a free lock, else blocks
on that list with a ``SET NX`` right behind: a release wakes the first waiter, and the server
takes the lock for it with no round trip in between.

Everything goes through redis-py's public client API: its connection pools check the process id,
so a forked child never talks on its parent's connections.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.checks import CheckMessage, Error
from django.core.exceptions import ImproperlyConfigured

from django_isolatable.backends.base import Backend, BackendOptions, Lease, Waiting, missing_driver
from django_isolatable.backends.periods import RedisPeriods
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, this_pid, utcnow

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
#: How long a command may take before it is a ``LockIOError`` (renewals: see ``refresh``).
COMMAND_TIMEOUT = 10.0
#: The longest ``BLPOP`` of a wait: well inside ``COMMAND_TIMEOUT``; a longer wait blocks again.
LONGEST_BLOCK = COMMAND_TIMEOUT / 2
#: A wake-up nobody consumed is dropped after this long.
WAKE_TTL_MS = 5000
#: A renewal's socket timeout, as a fraction of the TTL: renewals run every TTL/3, so a renewal
#: that meets a server that stopped answering gives up well before the lease ends.
RENEWAL_TIMEOUT_SHARE = 0.25

# With ARGV[1] empty, every value matches: that is a release whoever holds the lock.
# One wake-up element at most: one nobody took yet wakes the next waiter all the same.
RELEASE = (
    "local v = redis.call('get', KEYS[1]) "
    "if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then redis.call('del', KEYS[1]) "
    "if redis.call('llen', KEYS[2]) == 0 then "
    "redis.call('lpush', KEYS[2], 1) redis.call('pexpire', KEYS[2], ARGV[2]) end "
    "return 1 end return 0"
)
# A waiter's take of a free lock; it leaves the waiter's own BLPOP a wake-up to return on.
TAKE = (
    "if redis.call('set', KEYS[1], ARGV[1], 'nx', 'px', ARGV[2]) then "
    "redis.call('lpush', KEYS[2], 1) redis.call('pexpire', KEYS[2], ARGV[3]) return 1 end return 0"
)
REFRESH = (
    "local v = redis.call('get', KEYS[1]) "
    "if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)

DRIVER_MISSING = (
    "The redis strategy needs the redis package: pip install 'django-isolatable[redis]'."
)
# Query parameters that may carry a credential: password=, pass=, pwd=, auth_token=, secret=...
_SECRET_PARAMETER = re.compile(
    r"(?i)([?&;][^=&;#]*(?:pass|pwd|token|secret|auth|credential)[^=&;#]*=)[^&;#]*"
)
# scheme://user:password@ (the password may hold an unescaped "@": the last one ends it)
_USERINFO_PASSWORD = re.compile(r"^([^:/?#]+://[^:@/?#]*:)[^/?#]*@")


def safe_url(url: str) -> str:
    """``url`` with every credential it can carry masked (the userinfo password and
    secret-looking query parameters; the username stays), for messages. Never raises, also for
    a malformed URL."""
    url = _USERINFO_PASSWORD.sub(r"\1***@", url, count=1)
    return _SECRET_PARAMETER.sub(r"\1***", url)


def _url_problem(url: str) -> tuple[str, str] | None:
    """(check id, sentence) for a ``REDIS_URL`` redis-py cannot use, or None."""
    import redis

    shown = f'settings.ISOLATABLE["REDIS_URL"] is {safe_url(url)!r}'
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return "isolatable.E021", f"{shown}; use a redis://, rediss:// or unix:// URL."
    try:
        pool = redis.ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)  # unknown query options fail here
    except (ValueError, TypeError) as e:
        reason = safe_url(str(e)).rstrip(".")
        return "isolatable.E022", f"{shown}, which is not a valid Redis URL ({reason}); fix it."
    return None


@functools.cache
def _client(url: str, timeout: float) -> redis.Redis:
    """One client (and connection pool) per URL and socket timeout, per process. The timeouts
    are the strategy's own, whatever the URL's query says, and a failed command is not
    retried: the wait loop and the renewal thread do their own retrying.

    Raises ``ImproperlyConfigured`` for a URL redis-py cannot use (and caches only clients)."""
    import redis

    problem = _url_problem(url)
    if problem is not None:
        raise ImproperlyConfigured(problem[1])
    parsed = redis.ConnectionPool.from_url(url)
    options = {
        **parsed.connection_kwargs,
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, CONNECT_TIMEOUT),
        "retry": None,
    }
    pool = redis.ConnectionPool(connection_class=parsed.connection_class, **options)
    return redis.Redis(connection_pool=pool)


@functools.cache
def _scripts(url: str) -> tuple[Script, Script]:
    """The release and refresh scripts, registered once per URL (each computes its SHA1)."""
    client = _client(url, COMMAND_TIMEOUT)
    return client.register_script(RELEASE), client.register_script(REFRESH)


class RedisBackend(Backend, Waiting, RedisPeriods):
    strategy: ClassVar[str] = "redis"
    expiring: ClassVar[bool] = True
    heartbeat: ClassVar[bool] = True

    def __init__(self, options: BackendOptions) -> None:
        super().__init__(options)
        self.url = options.redis_url
        try:  # the driver is imported only by this strategy, when it is used
            import redis.exceptions
        except ImportError as e:
            raise ImproperlyConfigured(DRIVER_MISSING) from e
        self._errors = redis.exceptions
        self.client = _client(self.url, COMMAND_TIMEOUT)
        self._release, self._refresh = _scripts(self.url)
        self._prefix = f"{options.key_prefix}isolatable:".encode("utf-8", "surrogatepass")

    @classmethod
    def check_settings(cls, options: BackendOptions) -> list[CheckMessage]:
        missing = missing_driver("redis", "redis", "redis", "isolatable.E020")
        if missing:
            return missing
        problem = _url_problem(options.redis_url)
        return [] if problem is None else [Error(problem[1], id=problem[0])]

    def store(self) -> str:
        return safe_url(self.url)

    def _keys(self, name: str) -> tuple[bytes, bytes]:
        """The lock key and the wake-up list of ``name``."""
        encoded = name.encode("utf-8", "surrogatepass")
        return self._prefix + b"lock:" + encoded, self._prefix + b"wake:" + encoded

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)``, its redis-py errors as ``LockIOError``."""
        try:
            return function(*args, **kwargs)
        except self._errors.ConnectionError as e:
            raise LockIOError(
                f"Redis at {safe_url(self.url)} is unreachable ({safe_url(str(e))}); check that "
                'it runs and settings.ISOLATABLE["REDIS_URL"].'
            ) from e
        except self._errors.TimeoutError as e:
            raise LockIOError(
                f"Redis at {safe_url(self.url)} did not answer in time to {what} "
                f"({safe_url(str(e))}); check that it runs and is reachable."
            ) from e
        except self._errors.RedisError as e:
            raise LockIOError(
                f"Redis at {safe_url(self.url)} failed to {what}: {safe_url(str(e))}."
            ) from e

    def _value(self, info: LockInfo) -> bytes:
        return f"{info.token or ''} {info.to_json()}".encode("utf-8", "surrogatepass")

    def _ttl_ms(self) -> int:
        return max(1, int(self.options.ttl * 1000))

    def acquire(self, name: str, info: LockInfo) -> Lease | None:
        key, _ = self._keys(name)
        value = self._value(info)
        if not self._call("lock", self.client.set, key, value, nx=True, px=self._ttl_ms()):
            return None
        return Lease(name=name, token=info.token or "", info=info)

    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        """One pipeline: take the lock if it is free, else block on the wake-up list with the
        take right behind, so a release wakes the first waiter and the server takes the lock
        for it at once. Interrupted (an error, ``KeyboardInterrupt``, a signal handler's
        exception), it releases by its token what the server may have taken."""
        key, wake = self._keys(name)
        value, deadline = self._value(info), time.monotonic() + timeout
        lease = Lease(name=name, token=info.token or "", info=info)
        took = self._prefix + b"took:" + lease.token.encode()  # this waiter's own wake-up
        try:
            while (left := deadline - time.monotonic()) > 0:
                pipeline = self.client.pipeline(transaction=False)
                pipeline.eval(TAKE, 2, key, took, value, self._ttl_ms(), WAKE_TTL_MS)
                block = round(max(min(left, LONGEST_BLOCK), 0.001), 3)  # BLPOP 0: forever
                pipeline.blpop([took, wake], timeout=block)
                pipeline.set(key, value, nx=True, px=self._ttl_ms())
                if any(self._call("wait", pipeline.execute)[::2]):  # taken free, or woken
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
        return bool(self._call("release", self._release, keys=keys, args=(owner, WAKE_TTL_MS)))

    def refresh(self, lease: Lease, ttl: float) -> bool:
        """Renew on a client whose socket timeout is a share of ``ttl``: a server that stopped
        answering (a network black hole) makes this raise ``LockIOError`` well within the
        time left on the lease, not after ``COMMAND_TIMEOUT``."""
        key, _ = self._keys(lease.name)
        client = _client(self.url, max(0.01, round(ttl * RENEWAL_TIMEOUT_SHARE, 3)))
        owner, ttl_ms = f"{lease.token} ".encode(), max(1, int(ttl * 1000))
        return bool(self._call("renew", self._refresh, (key,), (owner, ttl_ms), client))

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
            info = LockInfo.from_json(name, self.strategy, record) or LockInfo(name, self.strategy)
            expires_at = now + timedelta(milliseconds=pttl) if pttl >= 0 else None
            yield replace(info, token=token, expires_at=expires_at)

    def inspect(self, name: str) -> list[LockInfo]:
        key, _ = self._keys(name)
        return list(self._records([key]))

    def list(self) -> Iterator[LockInfo]:
        pattern = _glob_escape(self._prefix + b"lock:") + b"*"
        batch: list[bytes] = []
        for key in self._each("list locks", self.client.scan_iter(pattern, count=500)):
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
