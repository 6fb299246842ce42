"""System checks: bad ISOLATABLE settings are reported by ``manage.py check``."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error, Warning, register
from django.core.exceptions import ImproperlyConfigured

from django_isolatable.conf import isolatable_settings, strategy_problem


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Every problem in ``settings.ISOLATABLE``, then the chosen strategy's own checks."""
    messages: list[CheckMessage] = [
        (Warning if problem.warning else Error)(problem.message, id=problem.id)
        for problem in isolatable_settings.problems()
    ]
    if any(message.is_serious() for message in messages):
        return messages
    from django_isolatable.backends import load_backend_class, options_from_settings

    strategy = isolatable_settings.STRATEGY
    try:
        backend_class = load_backend_class(strategy)
    except ImproperlyConfigured:  # a dotted path that does not import, or names no backend
        problem = strategy_problem(strategy)
        return [*messages, Error(problem.message, id=problem.id)]
    return [*messages, *backend_class.check_settings(options_from_settings())]
