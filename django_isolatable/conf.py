"""The ``settings.ISOLATABLE`` dict, read live with defaults and validated in one place.

Each value is validated on first use and remembered until ``ISOLATABLE`` changes through
``override_settings`` or pytest-django's ``settings`` fixture (Django's ``setting_changed``
signal, which Django's own setting caches follow too); an unknown key (a typo, which would leave
a default silently in force) is an error at the first use after each change. Nothing is written
into ``django.conf.settings``. Each problem has one message, used both by the system checks and
by the ``ImproperlyConfigured`` raised when the app is used with that value.
"""

from __future__ import annotations

import difflib
import getpass
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

from django_isolatable import conf_redis

DEFAULTS: dict[str, Any] = {
    "STRATEGY": "file",
    "LOCK_DIR": None,  # computed: see Settings.LOCK_DIR
    "TIMEOUT": None,
    "TTL": 60,
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "CACHE_ALIAS": "default",
    "DATABASE_ALIAS": "default",
    "KEY_PREFIX": "",
    "SKIPPED_EXIT_CODE": 0,
    "RECORD_ARGV": "full",
    "MAX_AGE": None,
    "OVERDUE_EXIT_CODE": 2,
    "REDIS_SENTINELS": None,
    "REDIS_SENTINEL_SERVICE": None,
    "REDIS_CLUSTER": False,
    "REDIS_REPLICA_ACKS": 0,
}
#: The built-in strategies' names (``LockStrategy``'s values); anything else must be a dotted
#: path, whose import ``manage.py check`` tries (checks.py): settings never import backends.
BUILTIN_STRATEGIES = ("file", "memory", "redis", "cache", "database", "postgres")
#: The longest lease: one day. Every store takes it as a relative expiry (Memcached reads more
#: than 30 days as a date), and a holder killed on another host keeps its lock for a TTL.
MAX_TTL = 86400
RECORD_ARGV_VALUES = ("full", "command", "none")
_DOTTED_PATH = re.compile(r"[^\W\d]\w*(\.[^\W\d]\w*)+")


@dataclass(frozen=True)
class Problem:
    """One bad setting: the check id and the sentence that names the key, the value and the fix."""

    id: str
    message: str

    @property
    def warning(self) -> bool:
        """A warning (``isolatable.W0NN``): reported by the checks, never raised."""
        return self.id.startswith("isolatable.W")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _key(name: str) -> str:
    return f'settings.ISOLATABLE["{name}"]'


class Settings:
    """Typed, validated access to ``settings.ISOLATABLE``; an invalid value raises
    ``ImproperlyConfigured`` with the same sentence ``manage.py check`` reports."""

    def __init__(self) -> None:
        # Valid values by key: locks of the renewed strategies read TTL, and every new record
        # RECORD_ARGV, on every acquire.
        self._valid: dict[str, Any] = {}
        #: Counts the changes of ``ISOLATABLE``: what was built from the settings (a lock's
        #: backend) is built again once it differs.
        self.generation = 0
        self._keys_known = False  # no unknown key in this generation's ISOLATABLE

    def raw(self) -> dict[str, Any]:
        value = getattr(django_settings, "ISOLATABLE", {})
        if not isinstance(value, dict):
            raise ImproperlyConfigured(_not_a_dict(value).message)
        return value

    def _get(self, name: str) -> Any:
        try:
            return self._valid[name]
        except KeyError:
            pass
        raw = self.raw()
        if not self._keys_known:
            unknown = _unknown_keys(raw)
            if unknown:
                raise ImproperlyConfigured(unknown[0].message)
            self._keys_known = True
        value = raw.get(name, DEFAULTS[name])
        problem = _VALIDATORS[name](value)
        if problem is None and name in conf_redis.RELATED_KEYS:
            problem = next((p for p in _relations(raw) if not p.warning), None)
        if problem is not None:
            raise ImproperlyConfigured(problem.message)
        self._valid[name] = value
        return value

    def forget(self) -> None:
        """Read every value again on next use (``ISOLATABLE`` changed)."""
        self._valid.clear()
        self._keys_known = False
        self.generation += 1

    @property
    def STRATEGY(self) -> str:
        return str(self._get("STRATEGY"))

    @property
    def LOCK_DIR(self) -> Path:
        value = self._get("LOCK_DIR")
        if value is not None:
            return Path(value)
        base_dir = getattr(django_settings, "BASE_DIR", None)
        if base_dir is not None:
            return Path(base_dir) / ".locks"
        # Per user and project. The file strategy refuses the folder if another user made it
        # first (or put a link there): a fresh one instead would split one project's processes
        # over several folders, and so let two of them hold one lock.
        # override_settings hides SETTINGS_MODULE; the environment still names it.
        module = django_settings.SETTINGS_MODULE or os.environ.get("DJANGO_SETTINGS_MODULE")
        module = re.sub(r"[^A-Za-z0-9_.-]", "_", module or "settings")
        return Path(tempfile.gettempdir()) / f"django-isolatable-{_user()}-{module}"

    @property
    def TIMEOUT(self) -> float | None:
        value = self._get("TIMEOUT")
        return None if value is None else float(value)

    @property
    def TTL(self) -> float:
        return float(self._get("TTL"))

    @property
    def REDIS_URL(self) -> str:
        return str(self._get("REDIS_URL"))

    @property
    def CACHE_ALIAS(self) -> str:
        return str(self._get("CACHE_ALIAS"))

    @property
    def DATABASE_ALIAS(self) -> str:
        return str(self._get("DATABASE_ALIAS"))

    @property
    def KEY_PREFIX(self) -> str:
        return str(self._get("KEY_PREFIX"))

    @property
    def SKIPPED_EXIT_CODE(self) -> int:
        return int(self._get("SKIPPED_EXIT_CODE"))

    @property
    def RECORD_ARGV(self) -> str:
        return str(self._get("RECORD_ARGV"))

    @property
    def MAX_AGE(self) -> float | None:
        value = self._get("MAX_AGE")
        return None if value is None else float(value)

    @property
    def OVERDUE_EXIT_CODE(self) -> int:
        return int(self._get("OVERDUE_EXIT_CODE"))

    @property
    def REDIS_SENTINELS(self) -> tuple[tuple[str, int], ...]:
        """The sentinels' ``(host, port)`` pairs; empty when Sentinel is not used."""
        return tuple(
            filter(None, map(conf_redis.sentinel_address, self._get("REDIS_SENTINELS") or ()))
        )

    @property
    def REDIS_SENTINEL_SERVICE(self) -> str | None:
        value = self._get("REDIS_SENTINEL_SERVICE")
        return None if value is None else str(value)

    @property
    def REDIS_CLUSTER(self) -> bool:
        return bool(self._get("REDIS_CLUSTER"))

    @property
    def REDIS_REPLICA_ACKS(self) -> int:
        return int(self._get("REDIS_REPLICA_ACKS"))

    def problems(self) -> list[Problem]:
        """Every problem in the current settings, for the system checks."""
        raw = getattr(django_settings, "ISOLATABLE", {})
        if not isinstance(raw, dict):
            return [_not_a_dict(raw)]
        found = _unknown_keys(raw)
        for name, validate in _VALIDATORS.items():
            problem = validate(raw.get(name, DEFAULTS[name]))
            if problem is not None:
                found.append(problem)
        return found + _relations(raw)


def _relations(raw: dict[str, Any]) -> list[Problem]:
    """The problems between keys (a Sentinel list without its service name...)."""
    checks = conf_redis.relations(lambda name: raw.get(name, DEFAULTS[name]))
    return [Problem(check_id, message) for check_id, message in checks]


def _checked(
    validate: Callable[[object], tuple[str, str] | None],
) -> Callable[[object], Problem | None]:
    def check(value: object) -> Problem | None:
        found = validate(value)
        return None if found is None else Problem(*found)

    return check


def _user() -> str:
    """This process's user name, by its effective uid: not the USER or LOGNAME a process of
    another user may have inherited, which would name (and make) this user's folder."""
    try:
        import pwd
    except ImportError:  # not a POSIX system
        user = getpass.getuser()
    else:
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # no passwd entry (containers with an arbitrary uid)
            user = str(os.geteuid())
    return re.sub(r"[^A-Za-z0-9_.-]", "_", user)


def _did_you_mean(value: object, choices: Iterable[str], *, case: Callable[[str], str]) -> str:
    """``"; did you mean 'X'?"`` for the choice closest to a misspelt ``value`` (compared after
    ``case``, such as ``str.upper``), or ``""`` when none is close: the hint every message about
    an unknown key or strategy ends with."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(case(value), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def strategy_hint(value: object) -> str:
    """``"; did you mean 'redis'?"`` for a misspelt strategy name (not for a dotted path)."""
    if isinstance(value, str) and "." in value:
        return ""
    return _did_you_mean(value, BUILTIN_STRATEGIES, case=str.lower)


def _unknown_keys(raw: dict[Any, Any]) -> list[Problem]:
    return [
        Problem(
            "isolatable.E009",
            f"settings.ISOLATABLE has the unknown key {key!r}"
            + (
                _did_you_mean(key, DEFAULTS, case=str.upper)
                or f"; remove it, or use one of the known keys: {', '.join(DEFAULTS)}."
            ),
        )
        for key in raw
        if key not in DEFAULTS
    ]


def _not_a_dict(value: object) -> Problem:
    return Problem(
        "isolatable.E001",
        f"settings.ISOLATABLE must be a dict, not {type(value).__name__} ({value!r}).",
    )


def _strategy(value: object) -> Problem | None:
    if isinstance(value, str) and (value in BUILTIN_STRATEGIES or _DOTTED_PATH.fullmatch(value)):
        return None
    return strategy_problem(value)


def strategy_problem(value: object) -> Problem:
    """The problem of a STRATEGY that names no strategy, or no importable backend class."""
    return Problem(
        "isolatable.E002",
        f"{_key('STRATEGY')} is {value!r}, which is neither a strategy "
        f"({', '.join(BUILTIN_STRATEGIES)}) nor the dotted path of an importable backend class"
        + (strategy_hint(value) or "."),
    )


def _lock_dir(value: object) -> Problem | None:
    if value is None or (isinstance(value, (str, Path)) and str(value)):
        return None
    return Problem(
        "isolatable.E003",
        f"{_key('LOCK_DIR')} is {value!r}; set it to a directory path (str or pathlib.Path).",
    )


def _timeout(value: object) -> Problem | None:
    if value is None or (_is_number(value) and value >= 0):  # type: ignore[operator]
        return None
    return Problem(
        "isolatable.E004",
        f"{_key('TIMEOUT')} is {value!r}; use None (wait forever) or a number of seconds >= 0.",
    )


def is_valid_ttl(value: object) -> bool:
    """A lease length: a number of seconds > 0 and at most ``MAX_TTL`` (bool is no number).
    ``CommandIsolation(ttl=...)`` holds its argument to the same bound."""
    return _is_number(value) and 0 < value <= MAX_TTL  # type: ignore[operator]


def _ttl(value: object) -> Problem | None:
    if is_valid_ttl(value):
        return None
    return Problem(
        "isolatable.E005",
        f"{_key('TTL')} is {value!r}; use a number of seconds > 0 and at most {MAX_TTL} (a day): "
        "leases must expire.",
    )


def _string(name: str, id: str) -> Callable[[object], Problem | None]:
    def validate(value: object) -> Problem | None:
        if isinstance(value, str):
            return None
        return Problem(id, f"{_key(name)} is {value!r}; it must be a string.")

    return validate


def _exit_code(name: str, id: str) -> Callable[[object], Problem | None]:
    def validate(value: object) -> Problem | None:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
            return None
        return Problem(id, f"{_key(name)} is {value!r}; use an exit status from 0 to 255.")

    return validate


def is_valid_max_age(value: object) -> bool:
    """A maximum age: None (no limit) or a number of seconds > 0."""
    return value is None or (_is_number(value) and value > 0)  # type: ignore[operator]


def _max_age(value: object) -> Problem | None:
    if is_valid_max_age(value):
        return None
    return Problem(
        "isolatable.E013",
        f"{_key('MAX_AGE')} is {value!r}; use None (no limit) or the number of seconds after "
        "which a holder is overdue (> 0).",
    )


def _record_argv(value: object) -> Problem | None:
    if isinstance(value, str) and value in RECORD_ARGV_VALUES:
        return None
    return Problem(
        "isolatable.E008",
        f"{_key('RECORD_ARGV')} is {value!r}; use one of "
        f"{', '.join(repr(v) for v in RECORD_ARGV_VALUES)}.",
    )


_VALIDATORS = {
    "STRATEGY": _strategy,
    "LOCK_DIR": _lock_dir,
    "TIMEOUT": _timeout,
    "TTL": _ttl,
    "REDIS_URL": _string("REDIS_URL", "isolatable.E006"),
    "CACHE_ALIAS": _string("CACHE_ALIAS", "isolatable.E006"),
    "DATABASE_ALIAS": _string("DATABASE_ALIAS", "isolatable.E006"),
    "KEY_PREFIX": _string("KEY_PREFIX", "isolatable.E006"),
    "SKIPPED_EXIT_CODE": _exit_code("SKIPPED_EXIT_CODE", "isolatable.E007"),
    "RECORD_ARGV": _record_argv,
    "MAX_AGE": _max_age,
    "OVERDUE_EXIT_CODE": _exit_code("OVERDUE_EXIT_CODE", "isolatable.E014"),
    **{name: _checked(validate) for name, validate in conf_redis.VALIDATORS.items()},
}

isolatable_settings = Settings()


def _setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "ISOLATABLE":
        isolatable_settings.forget()


setting_changed.connect(_setting_changed, dispatch_uid="django_isolatable.conf")
