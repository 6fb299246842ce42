"""Every strategy against the shared contract (see tests/conformance.py)."""

from typing import ClassVar

from tests import services
from tests.conformance import LockConformance
from tests.settings import KEY_PREFIX


class TestFileStrategy(LockConformance):
    strategy = "file"


class TestMemoryStrategy(LockConformance):
    strategy = "memory"


class TestRedisStrategy(LockConformance):
    strategy = "redis"
    service = "redis"
    isolatable_settings: ClassVar[dict[str, object]] = {
        "REDIS_URL": services.REDIS_URL,
        "KEY_PREFIX": KEY_PREFIX,
    }


class TestPostgresStrategy(LockConformance):
    strategy = "postgres"
    service = "postgres"
    isolatable_settings: ClassVar[dict[str, object]] = {
        "DATABASE_ALIAS": "postgres",
        "KEY_PREFIX": KEY_PREFIX,
    }


class DatabaseStrategy(LockConformance):
    strategy = "database"
    isolatable_settings: ClassVar[dict[str, object]] = {"TTL": 5}


class TestDatabaseStrategyOnSQLite(DatabaseStrategy):
    isolatable_settings: ClassVar[dict[str, object]] = {"TTL": 5, "DATABASE_ALIAS": "sqlite"}


class TestDatabaseStrategyOnPostgres(DatabaseStrategy):
    service = "postgres"
    isolatable_settings: ClassVar[dict[str, object]] = {
        "TTL": 5,
        "DATABASE_ALIAS": "postgres",
        "KEY_PREFIX": KEY_PREFIX,
    }


class TestDatabaseStrategyOnMariaDB(DatabaseStrategy):
    service = "mariadb"
    isolatable_settings: ClassVar[dict[str, object]] = {
        "TTL": 5,
        "DATABASE_ALIAS": "mariadb",
        "KEY_PREFIX": KEY_PREFIX,
    }


class TestCacheStrategyOnRedisCache(LockConformance):
    strategy = "cache"
    service = "redis"
    isolatable_settings: ClassVar[dict[str, object]] = {"TTL": 5, "CACHE_ALIAS": "redis"}
