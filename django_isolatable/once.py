"""Once per period (``once_per=SECONDS``): at most one successful run per period.

Periods are aligned to the Unix epoch on the store's clock: period ``P`` of ``once_per`` seconds
runs from ``P * once_per`` to ``(P + 1) * once_per`` seconds after the epoch, as the store that
keeps the records counts them (Redis ``TIME``, the database server's clock; this host's clock
for the file, memory and cache strategies), so hosts whose clocks disagree still agree on the
period. While holding the lock, a run reads whether its period's run happened (``open_period``:
if so, ``AlreadyRan``); once it succeeded, its guard records it (``Period.record``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from django_isolatable.backends.base import Backend, Periods
from django_isolatable.errors import AlreadyRan, IsolationError
from django_isolatable.holders import LockInfo


def check_once_per(value: object) -> float | None:
    """``once_per`` as float seconds (None: no periods); ``ValueError`` unless it is None or a
    finite number of seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"once_per must be None or a number of seconds > 0, not {value!r}.")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"once_per must be None or a number of seconds > 0, not {value!r}.")
    return float(value)


@dataclass(frozen=True)
class Period:
    """The period a held lock's run belongs to, in the store that keeps its record."""

    backend: Periods
    name: str
    seconds: float
    index: int

    def record(self, info: LockInfo) -> None:
        """Record that the run of ``info`` (the guard's holder record) used this period."""
        self.backend.record_run(self.name, self.seconds, self.index, info)


def open_period(backend: Backend, name: str, seconds: float) -> Period:
    """The current period of ``name`` on ``backend``'s store clock, for a caller that holds its
    lock. Raises ``AlreadyRan`` if the period's run happened already, ``IsolationError`` if
    the strategy cannot keep periods, ``LockIOError`` if the store fails."""
    if not isinstance(backend, Periods):
        raise IsolationError(
            f"The {backend.strategy} strategy cannot record runs per period, so "
            f"{name} cannot use once_per; use a strategy that can (all built-in ones do)."
        )
    index = math.floor(backend.store_time() / seconds)
    ran = backend.ran_in(name, seconds, index)
    if ran is not None:
        raise AlreadyRan(name, ran, seconds, index)
    return Period(backend, name, seconds, index)
