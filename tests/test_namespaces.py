"""KEY_PREFIX namespaces never overlap: prefix "P:ns:" with name "job" and prefix "P:" with name
"ns:job" are two locks on every strategy that uses a prefix (database, cache and memory here;
redis and postgres have tests of their own)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from django.test import override_settings

from django_isolatable.backends import backend_for
from django_isolatable.holders import new_record
from django_isolatable.models import Lock
from tests.strategies import (
    CACHE_ON_REDIS,
    DATABASE_CONFIGS,
    DATABASE_ON_SQLITE,
    MEMORY,
    StrategyConfig,
)

CONFIGS = [*DATABASE_CONFIGS, CACHE_ON_REDIS, MEMORY]
JOB = f"job-{os.getpid()}"  # unique to this session on a shared server
#: Pairs of (prefix, name) that joining prefix and name as they are makes one key.
OVERLAPS = [(("P:ns:", JOB), ("P:", f"ns:{JOB}")), (("P:", JOB), ("", f"P:{JOB}"))]


def backend_with_prefix(config: StrategyConfig, prefix: str) -> Any:
    isolatable = {"STRATEGY": config.strategy, **config.isolatable_settings, "KEY_PREFIX": prefix}
    with override_settings(ISOLATABLE=isolatable):
        return backend_for()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.id)
@pytest.mark.parametrize(("first", "second"), OVERLAPS, ids=["in-prefix", "empty-prefix"])
def test_prefixed_names_that_join_to_the_same_text_are_different_locks(config, first, second):
    config.require_service()
    (prefix_a, name_a), (prefix_b, name_b) = first, second
    a, b = backend_with_prefix(config, prefix_a), backend_with_prefix(config, prefix_b)
    lease_a = a.acquire(name_a, new_record(name_a, config.strategy, ttl=60))
    assert lease_a is not None
    try:
        lease_b = b.acquire(name_b, new_record(name_b, config.strategy, ttl=60))
        assert lease_b is not None, f"{first} and {second} are one lock"
        try:
            assert a.inspect(name_a)[0].token == lease_a.token
            assert b.inspect(name_b)[0].token == lease_b.token
            assert [i.name for i in a.list() if i.token == lease_b.token] == []
        finally:
            b.release(lease_b)
    finally:
        a.release(lease_a)


def test_without_a_prefix_keys_are_as_before():
    """Deployments with no KEY_PREFIX keep their keys: a lock held by an older version during
    an upgrade is still seen."""
    digest = hashlib.sha256(JOB.encode()).hexdigest()
    database = backend_with_prefix(DATABASE_ON_SQLITE, "")
    lease = database.acquire(JOB, new_record(JOB, "database", ttl=60))
    try:
        alias = DATABASE_ON_SQLITE.isolatable_settings["DATABASE_ALIAS"]
        assert Lock.objects.using(alias).get(token=lease.token).name_hash == digest
    finally:
        database.release(lease)
    with override_settings(ISOLATABLE={"STRATEGY": "cache", "KEY_PREFIX": ""}):
        assert backend_for()._key(JOB) == f"isolatable:{digest}"  # type: ignore[attr-defined]
