"""The strategy registry: strategy names and dotted paths to backend classes."""

from __future__ import annotations

import enum
import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from django_isolatable.backends.base import (
    Backend,
    BackendOptions,
    Fencing,
    Lease,
    Periods,
    Semaphore,
    Shared,
    Waiting,
    WakeUps,
)

__all__ = [
    "Backend",
    "BackendOptions",
    "Fencing",
    "Lease",
    "LockStrategy",
    "Periods",
    "Semaphore",
    "Shared",
    "Waiting",
    "WakeUps",
    "backend_for",
    "load_backend_class",
    "options_from_settings",
]


class LockStrategy(str, enum.Enum):
    """The built-in strategies; ``LockStrategy.FILE == "file"``."""

    FILE = "file"
    MEMORY = "memory"
    REDIS = "redis"
    CACHE = "cache"
    DATABASE = "database"
    POSTGRES = "postgres"

    def __str__(self) -> str:
        return self.value


# Keyed by value: a str enum member hashes by its name, so it would miss a plain "file" lookup.
BUILTIN_BACKENDS = {
    "file": "django_isolatable.backends.file.FileBackend",
    "memory": "django_isolatable.backends.memory.MemoryBackend",
    "redis": "django_isolatable.backends.redis.RedisBackend",
    "postgres": "django_isolatable.backends.postgres.PostgresBackend",
    "database": "django_isolatable.backends.database.DatabaseBackend",
    "cache": "django_isolatable.backends.cache.CacheBackend",
}


def load_backend_class(strategy: str) -> type[Backend]:
    """The backend class for a strategy name or a dotted path to a ``Backend`` subclass.

    Raises ``ImproperlyConfigured`` naming the strategy when it is unknown or not importable.
    """
    from django_isolatable.conf import strategy_hint

    value = strategy.value if isinstance(strategy, LockStrategy) else str(strategy)
    try:
        backend_class = import_string(BUILTIN_BACKENDS.get(value, value))
    except ImportError as e:
        raise ImproperlyConfigured(
            f"Unknown lock strategy {value!r}: use one of "
            f"{', '.join(s.value for s in LockStrategy)} or the dotted path of a backend class "
            f"({e})" + (strategy_hint(value) or ".")
        ) from e
    if not (isinstance(backend_class, type) and issubclass(backend_class, Backend)):
        raise ImproperlyConfigured(
            f"Lock strategy {value!r} is not a subclass of django_isolatable.backends.base.Backend."
        )
    return backend_class


def options_from_settings(
    *, lock_dir: str | os.PathLike[str] | None = None, ttl: float | None = None
) -> BackendOptions:
    """The options a backend gets from ``settings.ISOLATABLE``, with these overrides applied.

    Raises ``ImproperlyConfigured`` for a bad setting.
    """
    from django_isolatable.conf import isolatable_settings

    return BackendOptions(
        lock_dir=Path(lock_dir) if lock_dir is not None else isolatable_settings.LOCK_DIR,
        ttl=ttl if ttl is not None else isolatable_settings.TTL,
        key_prefix=isolatable_settings.KEY_PREFIX,
        redis_url=isolatable_settings.REDIS_URL,
        cache_alias=isolatable_settings.CACHE_ALIAS,
        database_alias=isolatable_settings.DATABASE_ALIAS,
        redis_sentinels=isolatable_settings.REDIS_SENTINELS,
        redis_sentinel_service=isolatable_settings.REDIS_SENTINEL_SERVICE,
        redis_cluster=isolatable_settings.REDIS_CLUSTER,
        redis_replica_acks=isolatable_settings.REDIS_REPLICA_ACKS,
    )


def backend_for(strategy: str | None = None) -> Backend:
    """The backend of ``strategy`` (default: the STRATEGY setting), configured from settings:
    what ``manage.py locks`` lists and releases through, without naming a lock.

    Raises ``ImproperlyConfigured`` for an unknown strategy or a bad setting.
    """
    from django_isolatable.conf import isolatable_settings

    chosen = strategy if strategy is not None else isolatable_settings.STRATEGY
    return load_backend_class(chosen)(options_from_settings())
