"""Validation of the redis strategy's high-availability settings: ``REDIS_SENTINELS``,
``REDIS_SENTINEL_SERVICE``, ``REDIS_CLUSTER`` and ``REDIS_REPLICA_ACKS`` (conf.py uses it).

Each check returns ``(check id, sentence)``: the sentence names the key, the value and the fix.
Ids ``isolatable.W0NN`` are warnings, the others errors. The settings are validated whatever
the strategy, like every other key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

Check = tuple[str, str]
SentinelAddress = tuple[str, int]

# host:port, or [IPv6]:port; a port of 1 to 5 ASCII digits (its range is checked apart).
_HOST_PORT = re.compile(r"(?:\[([0-9A-Fa-f:.%\w-]+)\]|([^\s/:@\[\]]+)):([0-9]{1,5})")
_EXAMPLE = '["sentinel-1:26379", "sentinel-2:26379", "sentinel-3:26379"]'


def _key(name: str) -> str:
    return f'settings.ISOLATABLE["{name}"]'


def sentinel_address(entry: object) -> SentinelAddress | None:
    """``(host, port)`` of a ``"host:port"`` (or ``"[IPv6]:port"``) string, else None."""
    match = _HOST_PORT.fullmatch(entry) if isinstance(entry, str) else None
    if match is None or not 0 < int(match[3]) <= 65535:
        return None
    return match[1] or match[2], int(match[3])


def sentinels(value: object) -> Check | None:
    if value is None:
        return None
    shown = f"{_key('REDIS_SENTINELS')} is {value!r}"
    fix = f'use a list of "host:port" strings, such as {_EXAMPLE}, or None.'
    if not isinstance(value, (list, tuple)):
        return "isolatable.E015", f"{shown}; {fix}"
    for entry in value:
        if sentinel_address(entry) is None:
            return "isolatable.E015", f'{shown}, where {entry!r} is not "host:port"; {fix}'
    return None


def sentinel_service(value: object) -> Check | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return None
    return (
        "isolatable.E016",
        f"{_key('REDIS_SENTINEL_SERVICE')} is {value!r}; use the name of the master the "
        "sentinels monitor (a non-empty string), or None without REDIS_SENTINELS.",
    )


def cluster(value: object) -> Check | None:
    if isinstance(value, bool):
        return None
    return (
        "isolatable.E017",
        f"{_key('REDIS_CLUSTER')} is {value!r}; use True (REDIS_URL names a node of a Redis "
        "Cluster) or False.",
    )


def replica_acks(value: object) -> Check | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return (
        "isolatable.E018",
        f"{_key('REDIS_REPLICA_ACKS')} is {value!r}; use the number of replicas that must "
        "confirm each lock and renewal (an integer >= 0; 0 waits for none).",
    )


VALIDATORS: dict[str, Callable[[object], Check | None]] = {
    "REDIS_SENTINELS": sentinels,
    "REDIS_SENTINEL_SERVICE": sentinel_service,
    "REDIS_CLUSTER": cluster,
    "REDIS_REPLICA_ACKS": replica_acks,
}
#: The keys ``relations`` reads: reading any of them must look at the others too.
RELATED_KEYS = frozenset({*VALIDATORS, "REDIS_URL"})


def _database(url: str) -> str | None:
    """The database number ``url`` selects other than 0 (its path or ``?db=``), else None."""
    parts = urlsplit(url)
    chosen = [parts.path.strip("/"), *parse_qs(parts.query).get("db", [])]
    return next((db for db in chosen if db.isdigit() and int(db) != 0), None)


def relations(value: Callable[[str], object]) -> list[Check]:
    """The problems between the keys, given each key's value (its default when not set);
    a key whose own value is invalid is left to its own check."""
    if any(validate(value(name)) for name, validate in VALIDATORS.items()):
        return []
    url, sentinels, service = (
        value("REDIS_URL"),
        value("REDIS_SENTINELS"),
        value("REDIS_SENTINEL_SERVICE"),
    )
    cluster, acks = value("REDIS_CLUSTER"), value("REDIS_REPLICA_ACKS")
    unix = isinstance(url, str) and url.startswith("unix://")
    database = _database(url) if isinstance(url, str) else None
    on_cluster = f"{_key('REDIS_CLUSTER')} is True"
    rules = [
        (
            sentinels and service is None,
            "isolatable.E016",
            f"{_key('REDIS_SENTINEL_SERVICE')} is None, but REDIS_SENTINELS is set; set it to the "
            'name of the master the sentinels monitor (their "sentinel monitor NAME ..." line), '
            "such as 'mymaster'.",
        ),
        (
            not sentinels and service is not None,
            "isolatable.W016",
            f"{_key('REDIS_SENTINEL_SERVICE')} is {service!r}, but REDIS_SENTINELS is empty: the "
            "redis strategy uses the server at REDIS_URL and asks no sentinel; set "
            "REDIS_SENTINELS, or remove REDIS_SENTINEL_SERVICE.",
        ),
        (
            sentinels and unix,
            "isolatable.E015",
            f"{_key('REDIS_SENTINELS')} is {sentinels!r}, but REDIS_URL is a unix:// URL; the "
            "sentinels name the master by host and port, which a socket path cannot reach: use "
            "a redis:// or rediss:// URL.",
        ),
        (
            cluster and sentinels,
            "isolatable.E017",
            f"{on_cluster} and REDIS_SENTINELS is set; a Redis Cluster fails over by itself, "
            "without sentinels: set only one of them.",
        ),
        (
            cluster and unix,
            "isolatable.E017",
            f"{on_cluster}, but REDIS_URL is a unix:// URL; a cluster's nodes are reached over "
            "TCP (each names the others by host and port): use the redis:// or rediss:// URL of "
            "any node.",
        ),
        (
            cluster and database is not None,
            "isolatable.E017",
            f"{on_cluster}, but REDIS_URL selects database {database}; a Redis Cluster has only "
            "database 0: remove the database number from REDIS_URL.",
        ),
        (
            not (cluster or sentinels) and acks != 0,
            "isolatable.W018",
            f"{_key('REDIS_REPLICA_ACKS')} is {acks!r}, but neither REDIS_SENTINELS nor "
            f"REDIS_CLUSTER is set: each lock waits for {acks} replica(s) of the server at "
            "REDIS_URL and fails if it has fewer, and a failover is followed only if REDIS_URL "
            "moves to the new master; set REDIS_SENTINELS or REDIS_CLUSTER, or "
            "REDIS_REPLICA_ACKS to 0.",
        ),
    ]
    return [(check_id, message) for applies, check_id, message in rules if applies]
