import pytest
from tests.conformance import LockConformance

class TestRedisClusterConformance(LockConformance):
    strategy = "redis"

    @pytest.fixture(autouse=True)
    def _strategy_settings(self, settings, django_db_blocker, redis_cluster):
        settings.ISOLATABLE = {**settings.ISOLATABLE, **redis_cluster.settings, "KEY_PREFIX": "scratch:"}
        with django_db_blocker.unblock():
            yield

class TestRedisSentinelConformance(LockConformance):
    strategy = "redis"

    @pytest.fixture(autouse=True)
    def _strategy_settings(self, settings, django_db_blocker, sentinel_group):
        settings.ISOLATABLE = {**settings.ISOLATABLE, **sentinel_group.settings, "KEY_PREFIX": "scratch:", "REDIS_REPLICA_ACKS": 1}
        with django_db_blocker.unblock():
            yield
