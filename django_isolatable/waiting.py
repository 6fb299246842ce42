"""The one wait loop: attempts, timeouts, back-off with jitter, and progress reports."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: First pause between polled attempts; pauses double up to the backend's ``poll_interval``.
FIRST_PAUSE = 0.001
PROGRESS_EVERY = 1.0


def wait_for(
    attempt: Callable[[float], T | None],
    timeout: float | None,
    *,
    blocking: bool,
    interval: float,
    progress: Callable[[float], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> T | None:
    """Call ``attempt(seconds)`` until it returns a result, or return None after ``timeout``
    seconds (None: never).

    The caller made the first attempt, which failed. ``blocking``: ``attempt(seconds)`` itself
    blocks for up to ``seconds`` (a backend that waits in its store) and is given slices of at
    most ``interval`` seconds. Otherwise ``attempt(0)`` is a single try, made after a pause that
    grows from ``FIRST_PAUSE`` to ``interval``, each drawn at random from its upper half so
    waiters that started together do not retry together.
    ``progress(waited_seconds)`` is called about once a second while waiting. A ``stop()``
    that returns True ends the wait (with None) before the next attempt.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    next_progress = start + PROGRESS_EVERY
    delay = FIRST_PAUSE
    while True:
        now = time.monotonic()
        left = interval if deadline is None else min(interval, deadline - now)
        if left <= 0 or (stop is not None and stop()):
            return None
        if blocking:
            result = attempt(left)
        else:
            time.sleep(min(left, random.uniform(delay / 2, delay)))
            delay = min(delay * 2, interval)
            if stop is not None and stop():
                return None
            result = attempt(0.0)
        if result is not None:
            return result
        if progress is not None and time.monotonic() >= next_progress:
            progress(time.monotonic() - start)
            next_progress = time.monotonic() + PROGRESS_EVERY
