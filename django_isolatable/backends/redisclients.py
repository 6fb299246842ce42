"""How the redis strategy reaches Redis: the server at ``REDIS_URL``, the current master of a
Sentinel group (``REDIS_SENTINELS``), or a Redis Cluster (``REDIS_CLUSTER``), each through
redis-py's own client for it (``Redis``, ``Sentinel.master_for``, ``RedisCluster``).

A Sentinel group's master is found by asking the sentinels each time a connection is opened
(redis-py's ``SentinelConnectionPool``): a connection the old master closed, or that meets a
master turned replica, is dropped, and the next one is opened to the new master. From
``REDIS_URL`` it takes the database, the username and password, TLS (``rediss://`` and its
``ssl_*`` options) and the other connection options, never the host and port. The sentinels
themselves are asked in plain TCP without a password, all of them in turn within the client's
timeout.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    import redis

    from django_isolatable.backends.base import BackendOptions

CONNECT_TIMEOUT = 5.0

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


def url_problem(url: str) -> tuple[str, str] | None:
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


@dataclass(frozen=True)
class Topology:
    """Where the strategy's Redis is: the settings that choose a client, hashable."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    cluster: bool = False

    @classmethod
    def of(cls, options: BackendOptions) -> Topology:
        service = options.redis_sentinel_service if options.redis_sentinels else None
        return cls(options.redis_url, options.redis_sentinels, service, options.redis_cluster)

    def store(self, safe_url: str) -> str:
        """``Backend.store()``: the URL (``safe_url``, its credentials masked), for a Sentinel
        group ``sentinel://<sentinels>/<service>``, for a cluster ``cluster+<URL>``."""
        if self.sentinels:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel://{hosts}/{self.service}"
        return f"cluster+{safe_url}" if self.cluster else safe_url

    @property
    def setting(self) -> str:
        """The setting that says where it is."""
        return "REDIS_SENTINELS" if self.sentinels else "REDIS_URL"

    def describe(self, safe_url: str) -> str:
        """How messages name it (``safe_url`` is the URL with its credentials masked)."""
        if self.sentinels:
            hosts = ", ".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"the master {self.service!r} of the sentinels {hosts}"
        if self.cluster:
            return f"the Redis Cluster at {safe_url}"
        return f"Redis at {safe_url}"


@functools.cache
def client(topology: Topology, timeout: float) -> Any:
    """One client (and connection pool) per topology and socket timeout, per process
    (``connect``).

    Raises ``ImproperlyConfigured`` for a URL redis-py cannot use (and caches only clients)."""
    problem = url_problem(topology.url)
    if problem is not None:
        raise ImproperlyConfigured(problem[1])
    return connect(topology, timeout)


def connect(topology: Topology, timeout: float) -> Any:
    """A new client (and connection pool) for ``topology`` with this socket timeout: a
    ``redis.Redis`` (also for a Sentinel group's master) or a ``redis.cluster.RedisCluster``.
    The timeouts are the strategy's own, whatever the URL's query says, and a failed command is
    not retried: the wait loop and the renewal thread do their own retrying (a cluster still
    follows ``MOVED`` and ``ASK`` redirections). The URL must be one redis-py can use."""
    import redis

    parsed = redis.ConnectionPool.from_url(topology.url)
    options = {
        **parsed.connection_kwargs,
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, CONNECT_TIMEOUT),
    }
    if topology.sentinels:
        return _sentinel_master(topology, parsed, options)
    if topology.cluster:
        return _cluster(parsed, options)
    pool = redis.ConnectionPool(connection_class=parsed.connection_class, retry=None, **options)
    return redis.Redis(connection_pool=pool)


def _sentinel_master(
    topology: Topology, parsed: redis.ConnectionPool, options: dict[str, Any]
) -> redis.Redis:
    import redis.sentinel

    for where in ("host", "port", "path"):
        options.pop(where, None)  # the sentinels name the master
    if issubclass(parsed.connection_class, redis.SSLConnection):
        options["ssl"] = True
    # Asking every sentinel in turn takes at most the client's own timeout.
    each = min(CONNECT_TIMEOUT, options["socket_timeout"] / len(topology.sentinels))
    asking = {"socket_timeout": each, "socket_connect_timeout": each}
    sentinel = redis.sentinel.Sentinel(list(topology.sentinels), sentinel_kwargs=asking)
    master: redis.Redis = sentinel.master_for(topology.service or "", retry=None, **options)
    return master


def _cluster(parsed: redis.ConnectionPool, options: dict[str, Any]) -> Any:
    import redis.cluster
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options.pop("db", None)  # a cluster has database 0 only (a check says so)
    if issubclass(parsed.connection_class, redis.SSLConnection):
        options["ssl"] = True
    return redis.cluster.RedisCluster(retry=Retry(NoBackoff(), 0), **options)
