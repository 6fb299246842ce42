"""``settings.ISOLATABLE_PROMETHEUS``, read live with defaults (nothing read at import time).

Keys: ``REGISTRY`` (a ``CollectorRegistry`` or its dotted path; default prometheus_client's
``REGISTRY``, read once when the app is ready), ``STRATEGIES`` (the strategies whose held locks
the age gauge reads; default ``[ISOLATABLE["STRATEGY"]]``), ``AGE_CACHE_SECONDS`` (how long one
read of the stores serves scrapes; default 5), ``NAME_LABEL`` (a callable or its dotted path
turning a lock name into the ``name`` label; default ``before_colon``).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.utils.module_loading import import_string

INSTALL_HINT = "pip install 'django-isolatable[prometheus]'"
KEYS = ("REGISTRY", "STRATEGIES", "AGE_CACHE_SECONDS", "NAME_LABEL")
DEFAULT_AGE_CACHE_SECONDS = 5.0


def before_colon(name: str) -> str:
    """The default ``name`` label: the lock name up to its first ``:`` (``"import:42"`` and
    ``"import:43"`` are both ``"import"``), so names filled in with ids stay a bounded set."""
    return name.split(":", 1)[0]


def full_name(name: str) -> str:
    """The lock name as it is: for projects whose lock names are a small, fixed set."""
    return name


def client_missing() -> bool:
    return importlib.util.find_spec("prometheus_client") is None


def missing_client_message() -> str:
    return (
        "django_isolatable.contrib.prometheus needs prometheus_client, which is not installed: "
        f"{INSTALL_HINT}"
    )


def _key(name: str) -> str:
    return f'settings.ISOLATABLE_PROMETHEUS["{name}"]'


def _values() -> dict[str, Any]:
    values = getattr(settings, "ISOLATABLE_PROMETHEUS", None) or {}
    if not isinstance(values, dict):
        raise ImproperlyConfigured("settings.ISOLATABLE_PROMETHEUS must be a dict.")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown key {unknown[0]!r} in settings.ISOLATABLE_PROMETHEUS: use {', '.join(KEYS)}."
        )
    return values


def _loaded(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return import_string(value)
        except ImportError as e:
            raise ImproperlyConfigured(f"{_key(name)} = {value!r} cannot be imported ({e}).") from e
    return value


def registry() -> Any:
    """The ``CollectorRegistry`` the metrics go on."""
    value = _loaded("REGISTRY", _values().get("REGISTRY"))
    if value is None:
        from prometheus_client import REGISTRY

        return REGISTRY
    if not callable(getattr(value, "register", None)):
        raise ImproperlyConfigured(f"{_key('REGISTRY')} must be a prometheus_client registry.")
    return value


def strategies() -> list[str]:
    value = _values().get("STRATEGIES")
    if value is None:
        from django_isolatable.conf import isolatable_settings

        return [str(isolatable_settings.STRATEGY)]
    if isinstance(value, str) or not all(isinstance(s, str) and s for s in value):
        raise ImproperlyConfigured(f"{_key('STRATEGIES')} must be a list of strategy names.")
    return [str(s) for s in value]


def age_cache_seconds() -> float:
    value = _values().get("AGE_CACHE_SECONDS", DEFAULT_AGE_CACHE_SECONDS)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ImproperlyConfigured(f"{_key('AGE_CACHE_SECONDS')} must be a number of seconds >= 0.")
    return float(value)


@functools.cache
def name_label() -> Callable[[str], str]:
    """The ``NAME_LABEL`` function; remembered until the setting changes (it runs on every
    lock call, so the dotted path is not imported each time)."""
    value = _loaded("NAME_LABEL", _values().get("NAME_LABEL", before_colon))
    if not callable(value):
        raise ImproperlyConfigured(f"{_key('NAME_LABEL')} must be a callable (name -> label).")
    function: Callable[[str], str] = value
    return function


def _forget(*, setting: str, **kwargs: Any) -> None:
    if setting == "ISOLATABLE_PROMETHEUS":
        name_label.cache_clear()


setting_changed.connect(_forget, dispatch_uid="isolatable-prometheus-settings")


def problems() -> list[str]:
    """Every bad value, as the sentence ``ImproperlyConfigured`` would carry."""
    found: list[str] = []
    reads: list[Callable[[], object]] = [registry, age_cache_seconds, name_label]
    # STRATEGIES only when set: its default is ISOLATABLE's STRATEGY, which has its own check.
    values = getattr(settings, "ISOLATABLE_PROMETHEUS", None)
    if isinstance(values, dict) and "STRATEGIES" in values:
        reads.append(strategies)
    for read in reads:
        try:
            read()
        except ImproperlyConfigured as e:
            if str(e) not in found:
                found.append(str(e))
    return found
