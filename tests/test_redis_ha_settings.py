"""REDIS_SENTINELS, REDIS_SENTINEL_SERVICE, REDIS_CLUSTER and REDIS_REPLICA_ACKS: defaults,
validation, the system checks that report bad values and bad combinations, and the
ImproperlyConfigured a lock raises with the same sentence."""

from __future__ import annotations

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from django_isolatable import CommandIsolation
from django_isolatable.backends import options_from_settings
from django_isolatable.conf import isolatable_settings

SENTINELS = ["10.0.0.1:26379", "sentinel-2.internal:26379", "[::1]:26380"]
EXAMPLE = '["sentinel-1:26379", "sentinel-2:26379", "sentinel-3:26379"]'
LIST_FIX = f'use a list of "host:port" strings, such as {EXAMPLE}, or None.'


def messages() -> list[tuple[str, str, str]]:
    """(level, check id, sentence) of every isolatable check message."""
    return [
        ("warning" if m.level == checks.WARNING else "error", m.id or "", m.msg)
        for m in checks.run_checks()
        if m.id and "isolatable" in m.id
    ]


def test_defaults_use_neither_sentinel_nor_cluster(settings):
    settings.ISOLATABLE = {}
    assert isolatable_settings.REDIS_SENTINELS == ()
    assert isolatable_settings.REDIS_SENTINEL_SERVICE is None
    assert isolatable_settings.REDIS_CLUSTER is False
    assert isolatable_settings.REDIS_REPLICA_ACKS == 0
    assert messages() == []


def test_a_sentinel_group_is_read_as_host_port_pairs_for_the_backend(settings):
    settings.ISOLATABLE = {
        "REDIS_SENTINELS": SENTINELS,
        "REDIS_SENTINEL_SERVICE": "mymaster",
        "REDIS_REPLICA_ACKS": 1,
    }
    assert messages() == []
    expected = (("10.0.0.1", 26379), ("sentinel-2.internal", 26379), ("::1", 26380))
    assert isolatable_settings.REDIS_SENTINELS == expected
    options = options_from_settings()
    assert options.redis_sentinels == expected
    assert (options.redis_sentinel_service, options.redis_replica_acks) == ("mymaster", 1)
    assert options.redis_cluster is False


@pytest.mark.parametrize("empty", [None, [], ()])
def test_an_empty_sentinel_list_means_no_sentinel(settings, empty):
    settings.ISOLATABLE = {"REDIS_SENTINELS": empty}
    assert isolatable_settings.REDIS_SENTINELS == ()
    assert messages() == []


def test_a_cluster_is_named_by_any_node(settings):
    settings.ISOLATABLE = {
        "REDIS_CLUSTER": True,
        "REDIS_URL": "rediss://node-1.internal:6379/0",
        "REDIS_REPLICA_ACKS": 1,
    }
    assert messages() == []
    assert options_from_settings().redis_cluster is True


@pytest.mark.parametrize(
    ("key", "value", "check_id", "message"),
    [
        (
            "REDIS_SENTINELS",
            "10.0.0.1:26379,10.0.0.2:26379",
            "isolatable.E015",
            "settings.ISOLATABLE[\"REDIS_SENTINELS\"] is '10.0.0.1:26379,10.0.0.2:26379'; "
            + LIST_FIX,
        ),
        (
            "REDIS_SENTINELS",
            ["10.0.0.1:26379", "10.0.0.2"],
            "isolatable.E015",
            "settings.ISOLATABLE[\"REDIS_SENTINELS\"] is ['10.0.0.1:26379', '10.0.0.2'], where "
            "'10.0.0.2' is not \"host:port\"; " + LIST_FIX,
        ),
        (
            "REDIS_SENTINELS",
            [("10.0.0.1", 26379)],
            "isolatable.E015",
            "settings.ISOLATABLE[\"REDIS_SENTINELS\"] is [('10.0.0.1', 26379)], where "
            "('10.0.0.1', 26379) is not \"host:port\"; " + LIST_FIX,
        ),
        (
            "REDIS_SENTINELS",
            ["sentinel:99999"],
            "isolatable.E015",
            "settings.ISOLATABLE[\"REDIS_SENTINELS\"] is ['sentinel:99999'], where "
            "'sentinel:99999' is not \"host:port\"; " + LIST_FIX,
        ),
        (
            "REDIS_SENTINELS",
            ["::1:26379"],
            "isolatable.E015",
            "settings.ISOLATABLE[\"REDIS_SENTINELS\"] is ['::1:26379'], where '::1:26379' is not "
            '"host:port"; ' + LIST_FIX,
        ),
        (
            "REDIS_SENTINEL_SERVICE",
            "",
            "isolatable.E016",
            "settings.ISOLATABLE[\"REDIS_SENTINEL_SERVICE\"] is ''; use the name of the master "
            "the sentinels monitor (a non-empty string), or None without REDIS_SENTINELS.",
        ),
        (
            "REDIS_CLUSTER",
            "yes",
            "isolatable.E017",
            "settings.ISOLATABLE[\"REDIS_CLUSTER\"] is 'yes'; use True (REDIS_URL names a node "
            "of a Redis Cluster) or False.",
        ),
        (
            "REDIS_CLUSTER",
            1,
            "isolatable.E017",
            'settings.ISOLATABLE["REDIS_CLUSTER"] is 1; use True (REDIS_URL names a node of a '
            "Redis Cluster) or False.",
        ),
        (
            "REDIS_REPLICA_ACKS",
            -1,
            "isolatable.E018",
            'settings.ISOLATABLE["REDIS_REPLICA_ACKS"] is -1; use the number of replicas that '
            "must confirm each lock and renewal (an integer >= 0; 0 waits for none).",
        ),
        (
            "REDIS_REPLICA_ACKS",
            True,
            "isolatable.E018",
            'settings.ISOLATABLE["REDIS_REPLICA_ACKS"] is True; use the number of replicas that '
            "must confirm each lock and renewal (an integer >= 0; 0 waits for none).",
        ),
    ],
)
def test_bad_values_are_check_errors_and_improperly_configured(
    settings, key, value, check_id, message
):
    settings.ISOLATABLE = {key: value}
    assert messages() == [("error", check_id, message)]
    with pytest.raises(ImproperlyConfigured) as raised:
        getattr(isolatable_settings, key)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("values", "check_id", "message"),
    [
        (
            {"REDIS_SENTINELS": SENTINELS[:1]},
            "isolatable.E016",
            'settings.ISOLATABLE["REDIS_SENTINEL_SERVICE"] is None, but REDIS_SENTINELS is set; '
            'set it to the name of the master the sentinels monitor (their "sentinel monitor '
            "NAME ...\" line), such as 'mymaster'.",
        ),
        (
            {
                "REDIS_SENTINELS": SENTINELS[:1],
                "REDIS_SENTINEL_SERVICE": "mymaster",
                "REDIS_URL": "unix:///run/redis/redis.sock",
            },
            "isolatable.E015",
            "settings.ISOLATABLE[\"REDIS_SENTINELS\"] is ['10.0.0.1:26379'], but REDIS_URL is a "
            "unix:// URL; the sentinels name the master by host and port, which a socket path "
            "cannot reach: use a redis:// or rediss:// URL.",
        ),
        (
            {"REDIS_CLUSTER": True, "REDIS_URL": "unix:///run/redis/redis.sock"},
            "isolatable.E017",
            'settings.ISOLATABLE["REDIS_CLUSTER"] is True, but REDIS_URL is a unix:// URL; a '
            "cluster's nodes are reached over TCP (each names the others by host and port): use "
            "the redis:// or rediss:// URL of any node.",
        ),
        (
            {"REDIS_CLUSTER": True, "REDIS_URL": "redis://node-1:6379/3"},
            "isolatable.E017",
            'settings.ISOLATABLE["REDIS_CLUSTER"] is True, but REDIS_URL selects database 3; a '
            "Redis Cluster has only database 0: remove the database number from REDIS_URL.",
        ),
        (
            {"REDIS_CLUSTER": True, "REDIS_URL": "redis://node-1:6379?db=2"},
            "isolatable.E017",
            'settings.ISOLATABLE["REDIS_CLUSTER"] is True, but REDIS_URL selects database 2; a '
            "Redis Cluster has only database 0: remove the database number from REDIS_URL.",
        ),
        (
            {
                "REDIS_CLUSTER": True,
                "REDIS_SENTINELS": SENTINELS[:1],
                "REDIS_SENTINEL_SERVICE": "mymaster",
            },
            "isolatable.E017",
            'settings.ISOLATABLE["REDIS_CLUSTER"] is True and REDIS_SENTINELS is set; a Redis '
            "Cluster fails over by itself, without sentinels: set only one of them.",
        ),
    ],
)
def test_keys_that_contradict_each_other_are_errors_on_every_key_involved(
    settings, values, check_id, message
):
    settings.ISOLATABLE = values
    assert messages() == [("error", check_id, message)]
    for key in [*values, "REDIS_URL"]:  # whichever of them a backend reads first
        with pytest.raises(ImproperlyConfigured) as raised:
            getattr(isolatable_settings, key)
        assert str(raised.value) == message


def test_a_lock_with_contradicting_redis_keys_is_improperly_configured(settings):
    """Whatever the strategy: every key is validated, as REDIS_URL's type always was."""
    settings.ISOLATABLE = {"STRATEGY": "memory", "REDIS_SENTINELS": SENTINELS}
    with pytest.raises(ImproperlyConfigured, match='"REDIS_SENTINEL_SERVICE"] is None, but'):
        CommandIsolation("x").try_lock()


@pytest.mark.parametrize(
    ("values", "check_id", "message"),
    [
        (
            {"REDIS_REPLICA_ACKS": 1},
            "isolatable.W018",
            'settings.ISOLATABLE["REDIS_REPLICA_ACKS"] is 1, but neither REDIS_SENTINELS nor '
            "REDIS_CLUSTER is set: each lock waits for 1 replica(s) of the server at REDIS_URL "
            "and fails if it has fewer, and a failover is followed only if REDIS_URL moves to "
            "the new master; set REDIS_SENTINELS or REDIS_CLUSTER, or REDIS_REPLICA_ACKS to 0.",
        ),
        (
            {"REDIS_SENTINEL_SERVICE": "mymaster", "REDIS_SENTINELS": []},
            "isolatable.W016",
            "settings.ISOLATABLE[\"REDIS_SENTINEL_SERVICE\"] is 'mymaster', but REDIS_SENTINELS "
            "is empty: the redis strategy uses the server at REDIS_URL and asks no sentinel; set "
            "REDIS_SENTINELS, or remove REDIS_SENTINEL_SERVICE.",
        ),
    ],
)
def test_what_may_be_a_mistake_is_a_warning_and_the_app_runs(settings, values, check_id, message):
    """A plain Redis may have replicas, and its URL may follow a failover (a managed Redis's
    primary endpoint): acks without Sentinel or Cluster can be right, so only a warning."""
    settings.ISOLATABLE = {"STRATEGY": "memory", **values}
    assert messages() == [("warning", check_id, message)]
    for key in values:
        getattr(isolatable_settings, key)
    with CommandIsolation("x").lock(timeout=0):
        pass


def test_a_bad_value_is_reported_alone_not_also_as_a_contradiction(settings):
    settings.ISOLATABLE = {"REDIS_SENTINELS": "10.0.0.1:26379", "REDIS_REPLICA_ACKS": 1}
    assert [check_id for _, check_id, _ in messages()] == ["isolatable.E015"]
