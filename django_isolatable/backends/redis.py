"""The redis strategy: ``SET key "<token> <record>" NX PX ttl``, renewed by a heartbeat.

A lock key's value is the owner token, a space and the holder's record as JSON: one ``SET``
takes the lock and records the holder. Release and renewal are Lua compare-and-delete /
compare-and-pexpire on the token (redis-py ``Script`` objects, which reload on NOSCRIPT). A
release pushes onto a per-name wake-up list; a waiter's pipeline takes a free lock, else blocks
on that list with a take right behind: a release wakes the first waiter, and the server takes
the lock for it with no round trip in between. Semaphore slots and shared holds are kept as
``redisholders.py`` says.

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
from django_isolatable.backends.redisholders import (
    GROUP,
    TAKE,
    TAKE_WOKEN,
    WAITING_MARK_MS,
    NameKeys,
    RedisHolders,
    Scripts,
    name_keys,
    register_scripts,
)
from django_isolatable.errors import LockIOError
from django_isolatable.holders import LockInfo, this_pid, utcnow

if TYPE_CHECKING:
    import redis

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
#: How long a command may take before it is a ``LockIOError`` (renewals: see ``refresh``).
COMMAND_TIMEOUT = 10.0
#: The longest ``BLPOP`` of a wait: well inside ``COMMAND_TIMEOUT``; a longer wait blocks again.
LONGEST_BLOCK = COMMAND_TIMEOUT / 2
#: A renewal's socket timeout, as a fraction of the TTL: renewals run every TTL/3, so a renewal
#: that meets a server that stopped answering gives up well before the lease ends.
RENEWAL_TIMEOUT_SHARE = 0.25

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
def _scripts(url: str) -> Scripts:
    """The scripts, registered once per URL (each computes its SHA1)."""
    return register_scripts(_client(url, COMMAND_TIMEOUT))


class RedisBackend(Backend, Waiting, RedisHolders, RedisPeriods):
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
        self.scripts = _scripts(self.url)
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

    def _keys(self, name: str) -> NameKeys:
        return name_keys(self._prefix, name)

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
        key = self._prefix + b"lock:" + name.encode("utf-8", "surrogatepass")  # NameKeys.lock
        value = self._value(info)
        if not self._call("lock", self.client.set, key, value, nx=True, px=self._ttl_ms()):
            return None
        return Lease(name=name, token=info.token or "", info=info)

    def acquire_waiting(self, name: str, info: LockInfo, timeout: float) -> Lease | None:
        """One pipeline: take the lock if it is free, else block on the wake-up list with the
        take right behind, so a release wakes the first waiter and the server takes the lock
        for it at once. While it waits, it is marked waiting, which holds off new shared holds
        (writer preference). Interrupted (an error, ``KeyboardInterrupt``, a signal handler's
        exception), it releases by its token what the server may have taken."""
        keys = self._keys(name)
        value, deadline = self._value(info), time.monotonic() + timeout
        lease = Lease(name=name, token=info.token or "", info=info)
        took = self._prefix + b"took:" + lease.token.encode()  # this waiter's own wake-up
        try:
            while (left := deadline - time.monotonic()) > 0:
                block = round(max(min(left, LONGEST_BLOCK), 0.001), 3)  # BLPOP 0: forever
                mark = int(block * 1000) + WAITING_MARK_MS
                args = (value, self._ttl_ms(), lease.token)
                pipeline = self.client.pipeline(transaction=False)
                pipeline.eval(TAKE, 6, *keys, took, *args, mark)
                pipeline.blpop([took, keys.wake], timeout=block)
                pipeline.eval(TAKE_WOKEN, 5, *keys, *args)
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
        return bool(self._call("release", self.scripts.release, keys, (owner,)))

    def refresh(self, lease: Lease, ttl: float) -> bool:
        """Renew on a client whose socket timeout is a share of ``ttl``: a server that stopped
        answering (a network black hole) makes this raise ``LockIOError`` well within the
        time left on the lease, not after ``COMMAND_TIMEOUT``."""
        keys = self._keys(lease.name)
        client = _client(self.url, max(0.01, round(ttl * RENEWAL_TIMEOUT_SHARE, 3)))
        owner, ttl_ms = f"{lease.token} ".encode(), max(1, int(ttl * 1000))
        return bool(self._call("renew", self.scripts.refresh, keys, (owner, ttl_ms), client))

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
            name = key[len(self._prefix) + len(b"lock:") :].decode("utf-8", "surrogatepass")
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
