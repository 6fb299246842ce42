"""``isolated``: run a function, a coroutine function or a task at most once at a time."""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import string
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, cast

from django_isolatable.backends import LockStrategy
from django_isolatable.errors import AlreadyRunning
from django_isolatable.isolation import (
    MAX_LABEL,
    CommandIsolation,
    LockGuard,
    _check_label,
    _check_name,
    _check_timeout,
    _extra,
)

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_current: contextvars.ContextVar[LockGuard | None] = contextvars.ContextVar(
    "django_isolatable_guard", default=None
)
#: How many lock names (after filling in the arguments) one decorated function keeps its
#: ``CommandIsolation`` for, so repeated calls reuse its backend and connections.
KEPT_NAMES = 1024


def current_guard() -> LockGuard | None:
    """The guard of the innermost ``isolated`` call running in this thread or task, else None:
    long work can call ``current_guard().check()``."""
    return _current.get()


def isolated(
    name: str | None = None,
    *,
    timeout: float | None = 0,
    if_running: Literal["skip", "raise"] = "skip",
    strategy: LockStrategy | str | None = None,
    ttl: float | None = None,
    max_holders: int = 1,
    shared: bool = False,
    label: str | None = None,
    once_per: float | None = None,
) -> Callable[[F], F]:
    """Decorate a function, a coroutine function or a task so it runs at most once at a time.

    ``name`` (default ``"<module>.<qualname>"``) and ``label`` are ``str.format`` templates
    over the call's arguments, bound to the signature with defaults applied (``"sync:{account}"``,
    ``"celery {self.request.id}"``). A call that does not get the lock within ``timeout``
    seconds (0: at once, None: wait forever) returns None without running
    (``if_running="skip"``) or raises ``AlreadyRunning`` / ``LockTimeout`` (``"raise"``).
    ``strategy`` and ``ttl`` are as for ``CommandIsolation``. With ``once_per`` (seconds), at
    most one call per period returns successfully: a call in a period whose call succeeded
    already is skipped (None) or raises ``AlreadyRan`` (``"raise"``); one that raised leaves
    the period open. ``max_holders=N`` lets up to N calls run at once (a semaphore);
    ``shared=True`` takes the lock shared: shared calls run together, never beside an
    exclusive holder of the name (``docs/more-than-one.md``).

    A label filled in longer than 200 characters is cut to 200 (it is for people to read; the
    name is what locks). A name or label that a call's arguments cannot fill (a ``**kwargs``
    key or an attribute the call lacks) raises ``ValueError`` at that call, before anything
    runs.

    Raises ``ValueError`` at decoration time for a placeholder the signature cannot fill, or a
    bad ``timeout``, ``if_running``, ``ttl``, ``label``, ``once_per``, ``max_holders`` or
    ``shared``; ``TypeError`` for a
    generator function (its body would run after the call returned and released the lock).
    """
    if if_running not in ("skip", "raise"):
        raise ValueError(f'if_running must be "skip" or "raise", not {if_running!r}.')
    wait = _check_timeout(timeout)
    if name is not None:
        _check_template(name, "name")
    if label is not None:
        _check_template(label, "label")
        _check_label(label if not _fields(label) else _literal_text(label))
    # The same ValueErrors as the class gives, at decoration time.
    CommandIsolation("check", ttl=ttl, once_per=once_per, max_holders=max_holders)._shared(shared)

    def decorate(function: F) -> F:
        if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(
                f"isolated() cannot wrap the generator function {function.__qualname__}: its "
                "body runs only as it is iterated, after the call returned and released the "
                "lock. Isolate a function that consumes it instead."
            )
        lock = _Calls(function, name, label, strategy, ttl, once_per, max_holders)
        skip = if_running == "skip"
        # A name without placeholders has one isolation, made once: nothing to fill in per call.
        fixed, fixed_label = lock.fixed, lock.label

        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                if fixed is not None:
                    isolation, text = fixed, fixed_label
                else:
                    isolation, text = lock.for_call(args, kwargs)
                try:
                    guard = await isolation._alock(wait, text, shared)
                except AlreadyRunning as e:
                    if not skip:
                        raise
                    _skipped(isolation, e)
                    return None
                token = _current.set(guard)
                try:
                    async with guard:  # leaving it records a once_per run that succeeded
                        return await function(*args, **kwargs)
                finally:
                    _current.reset(token)

            return cast(F, run_async)

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            if fixed is not None:
                isolation, text = fixed, fixed_label
            else:
                isolation, text = lock.for_call(args, kwargs)
            try:
                guard = isolation._lock(wait, None, text, shared=shared)
            except AlreadyRunning as e:
                if not skip:
                    raise
                _skipped(isolation, e)
                return None
            token = _current.set(guard)
            try:
                with guard:  # leaving it records a once_per run that succeeded
                    return function(*args, **kwargs)
            finally:
                _current.reset(token)

        return cast(F, run)

    return decorate


def _skipped(isolation: CommandIsolation, error: AlreadyRunning) -> None:
    logger.info(
        "Skipped %s: %s",
        isolation.name,
        error,
        extra=_extra(isolation.name, isolation.strategy, error.holder),
    )


class _Calls:
    """A decorated function's lock: its name and label filled in from each call's arguments."""

    def __init__(
        self,
        function: Callable[..., Any],
        name: str | None,
        label: str | None,
        strategy: LockStrategy | str | None,
        ttl: float | None,
        once_per: float | None = None,
        max_holders: int = 1,
    ) -> None:
        qualname = getattr(function, "__qualname__", None)
        if name is None and qualname is None:
            raise ValueError(
                f"{function!r} has no __qualname__ to name its lock: give isolated() a name."
            )
        self.qualname = qualname or repr(function)
        self.name = f"{function.__module__}.{qualname}" if name is None else name
        self.label = label
        self.signature = inspect.signature(function)
        parameters = self.signature.parameters.values()
        self.var_keyword = next(
            (p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), None
        )
        for template, what in ((name, "name"), (label, "label")):
            if template is not None:
                _check_fields(template, what, self.signature, self.var_keyword, self.qualname)
        self.templated = bool(_fields(self.name)) or bool(label and _fields(label))
        if not self.templated:  # filled in once: "{{" is "{" here too
            self.name = self.name.format()
            self.label = None if label is None else label.format()
        self.options: dict[str, Any] = {
            "strategy": strategy,
            "ttl": ttl,
            "once_per": once_per,
            "max_holders": max_holders,
        }
        self.isolations: dict[str, CommandIsolation] = {}
        #: The one isolation of a name without placeholders (None for a templated name).
        self.fixed = None if self.templated else self._isolation(self.name)

    def for_call(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[CommandIsolation, str | None]:
        """The isolation of this call's lock name, and its label (a templated name or label)."""
        bound = self.signature.bind(*args, **kwargs)  # a bad call fails as the call would
        bound.apply_defaults()
        values = bound.arguments
        if self.var_keyword is not None:  # its keys are placeholders too (named ones win)
            values = {**values[self.var_keyword], **values}
        name = self._fill(self.name, "name", values)
        if self.label is None:
            return self._isolation(name), None
        label = self._fill(self.label, "label", values)
        if len(label) > MAX_LABEL:
            label = label[: MAX_LABEL - 1] + "\u2026"
        return self._isolation(name), label.replace("\0", "\\0")

    def _fill(self, template: str, what: str, values: dict[str, Any]) -> str:
        try:
            return template.format_map(values)
        except (KeyError, AttributeError, IndexError, TypeError, ValueError) as e:
            why = f"no argument {e.args[0]!r}" if type(e) is KeyError else f"{e}"
            raise ValueError(
                f"The lock {what} {template!r} of {self.qualname} cannot be filled in from "
                f"this call's arguments: {why}."
            ) from e

    def _isolation(self, name: str) -> CommandIsolation:
        isolation = self.isolations.get(name)
        if isolation is None:
            if len(self.isolations) >= KEPT_NAMES:
                self.isolations.clear()
            isolation = CommandIsolation(_check_name(name), **self.options)
            self.isolations[name] = isolation
        return isolation


def _fields(template: str) -> list[str]:
    return list(_field_names(template))


def _literal_text(template: str) -> str:
    return "".join(literal for literal, _, _, _ in string.Formatter().parse(template))


def _field_names(template: str) -> Iterator[str]:
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is not None:
            yield field
            if spec:
                yield from _field_names(spec)


def _check_template(template: object, what: str) -> None:
    if not isinstance(template, str):
        raise ValueError(f"The lock {what} must be a str template, not {template!r}.")
    try:
        _fields(template)
    except ValueError as e:
        raise ValueError(f"The lock {what} {template!r} is not a valid template: {e}.") from e


def _check_fields(
    template: str,
    what: str,
    signature: inspect.Signature,
    var_keyword: str | None,
    qualname: str,
) -> None:
    for field in _fields(template):
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ValueError(
                f"The lock {what} {template!r} of {qualname} has a positional "
                "placeholder: name the argument, as in {account_id}."
            )
        if root not in signature.parameters and var_keyword is None:
            raise ValueError(
                f"The lock {what} {template!r} of {qualname} names {{{root}}}, "
                f"which is not an argument of {qualname}{signature}."
            )
