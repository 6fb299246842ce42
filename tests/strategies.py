"""Hypothesis strategies and per-strategy configurations for tests/test_properties.py.

``CONFIGS`` names every strategy the property tests run against, with the ISOLATABLE settings,
the server it needs (as tests/test_conformance.py configures them) and, for expiring
strategies, how to make a holder's lease expire behind its back: by moving its expiry into the
past in the store itself, so the store (not the test's clock) judges that it expired.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from django.conf import settings
from django.test import override_settings
from hypothesis import assume
from hypothesis import strategies as st

from django_isolatable import CommandIsolation, LockGuard
from django_isolatable.models import Lock
from tests import services
from tests.settings import KEY_PREFIX

LONG_AGO = datetime(2000, 1, 1, tzinfo=timezone.utc)


def expire_redis_lease(isolation: CommandIsolation, guard: LockGuard) -> None:
    """PEXPIREAT in the past: Redis drops the key at once, as when its TTL runs out."""
    backend: Any = isolation.backend
    key = backend._keys(isolation.name).lock
    assert backend.client.pexpireat(key, 1), "the lease to expire was not in Redis"


def expire_database_lease(isolation: CommandIsolation, guard: LockGuard) -> None:
    """Move the row's expiry into the past; the database server's clock then judges it."""
    alias = isolation.backend_options().database_alias
    rows = Lock.objects.using(alias).filter(token=guard.info.token)
    assert rows.update(expires_at=LONG_AGO) == 1, "the lease to expire was not in the table"


def expire_cache_lease(isolation: CommandIsolation, guard: LockGuard) -> None:
    """touch(key, 0): the cache server drops the entry at once, as when its timeout runs out."""
    backend: Any = isolation.backend
    assert backend.cache.touch(backend._key(isolation.name), 0), "the lease was not cached"


@dataclass(frozen=True)
class StrategyConfig:
    """One strategy as the property tests run it."""

    id: str
    strategy: str
    isolatable_settings: dict[str, object] = field(default_factory=dict)
    #: The server it needs (tests/services.py), if any.
    service: str | None = None
    #: Makes the current holder's lease expire, judged by the store (expiring strategies).
    expire: Callable[[CommandIsolation, LockGuard], None] | None = None
    #: The store keeps an expired lease's record until it is taken over or deleted.
    keeps_expired_records: bool = False

    def require_service(self) -> None:
        """Skip (or fail under ISOLATABLE_REQUIRE_SERVICES=1) when the server is down."""
        if self.service is not None:
            services.require(self.service)

    def override_settings(self) -> override_settings:
        """This strategy's settings on top of the current ones (LOCK_DIR from conftest), as a
        context manager or with ``enable()`` / ``disable()``."""
        isolatable = {**settings.ISOLATABLE, "STRATEGY": self.strategy, **self.isolatable_settings}
        return override_settings(ISOLATABLE=isolatable)


def _database(alias: str, service: str | None) -> StrategyConfig:
    return StrategyConfig(
        id=f"database-{alias}",
        strategy="database",
        isolatable_settings={"DATABASE_ALIAS": alias, "KEY_PREFIX": KEY_PREFIX},
        service=service,
        expire=expire_database_lease,
        keeps_expired_records=True,
    )


FILE = StrategyConfig(id="file", strategy="file")
MEMORY = StrategyConfig(id="memory", strategy="memory")
REDIS = StrategyConfig(
    id="redis",
    strategy="redis",
    isolatable_settings={"REDIS_URL": services.REDIS_URL, "KEY_PREFIX": KEY_PREFIX},
    service="redis",
    expire=expire_redis_lease,
)
POSTGRES = StrategyConfig(
    id="postgres",
    strategy="postgres",
    isolatable_settings={"DATABASE_ALIAS": "postgres", "KEY_PREFIX": KEY_PREFIX},
    service="postgres",
)
DATABASE_ON_SQLITE = _database("sqlite", None)
DATABASE_ON_POSTGRES = _database("postgres", "postgres")
DATABASE_ON_MARIADB = _database("mariadb", "mariadb")
CACHE_ON_REDIS = StrategyConfig(
    id="cache-redis",
    strategy="cache",
    isolatable_settings={"CACHE_ALIAS": "redis"},
    service="redis",
    expire=expire_cache_lease,
)
CONFIGS = [
    FILE,
    MEMORY,
    REDIS,
    POSTGRES,
    DATABASE_ON_SQLITE,
    DATABASE_ON_POSTGRES,
    DATABASE_ON_MARIADB,
    CACHE_ON_REDIS,
]
DATABASE_CONFIGS = [DATABASE_ON_SQLITE, DATABASE_ON_POSTGRES, DATABASE_ON_MARIADB]
#: The strategies whose locks live in a store of their own (every one but file and memory).
STORE_CONFIGS = [config for config in CONFIGS if config not in (FILE, MEMORY)]


# Lock names: all of Unicode but NUL, weighted towards what breaks escaping and paths.
# Not st.characters(categories=["Cs"]): one_of merges character strategies into one, in which
# the 2048 surrogates of 1.1 million code points would almost never be drawn.
lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)
_special = st.sampled_from("/.%~\\:*?[]{}'\" \t\n\r")
_safe = st.sampled_from(string.ascii_letters + string.digits + "-_.")
_controls = st.characters(categories=["Cc"], exclude_characters="\0")
_pieces = st.sampled_from(["..", "/", "../", "./", ".lock", "%2E", "%25", "~", "%"])


def characters(*, surrogates: bool = True) -> st.SearchStrategy[str]:
    """Any character but NUL; each kind that matters to a backend drawn often."""
    anything = st.characters(
        exclude_categories=() if surrogates else ("Cs",), exclude_characters="\0"
    )
    kinds = [anything, _special, _safe, _controls]
    return st.one_of(*kinds, lone_surrogates) if surrogates else st.one_of(*kinds)


def lock_names() -> st.SearchStrategy[str]:
    """Valid lock names: non-empty, no NUL; short and path-like, or up to 1000 characters.

    About half of them hold lone surrogates (valid ``str``, not valid UTF-8).
    """
    return st.one_of(_names(characters(surrogates=False)), _names(characters()))


def _names(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    short = st.lists(
        st.one_of(st.text(alphabet, min_size=1, max_size=8), _pieces), min_size=1, max_size=12
    ).map("".join)
    long = st.text(alphabet, min_size=110, max_size=1000)
    return st.one_of(short, long)


def names_with_lone_surrogates() -> st.SearchStrategy[str]:
    around = st.text(characters(surrogates=False), max_size=20)
    return st.tuples(around, lone_surrogates, around).map("".join)


def _percent_spelling(character: str) -> str:
    return "".join(f"%{b:02X}" for b in character.encode("utf-8", "surrogatepass"))


@st.composite
def confusable_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """A name and a different one built to collide with it under a careless escaping."""
    name = draw(lock_names())
    index = draw(st.integers(0, len(name) - 1))
    long_prefix = "a" * draw(st.integers(100, 130))
    variant = draw(
        st.sampled_from(
            [
                # One character spelled as its escape: "." against "%2E".
                name[:index] + _percent_spelling(name[index]) + name[index + 1 :],
                name.swapcase(),
                name[1:] if name.startswith(".") else "." + name,
                name + "~" + "0" * 64,
                name + ".lock",
                # Long names share a prefix: they must differ after hashing.
                long_prefix + name,
                long_prefix + name[::-1],
            ]
        )
    )
    first = draw(st.sampled_from([name, long_prefix + name]))
    assume(variant and variant != first)
    return first, variant
