"""The one wait loop: attempts, timeouts, back-off, wake-ups and progress reports."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: First pause between attempts; pauses double up to the backend's ``poll_interval``.
FIRST_PAUSE = 0.001
PROGRESS_EVERY = 1.0


def wait_for(
    attempt: Callable[[], T | None],
    pause: Callable[[float], None],
    timeout: float | None,
    *,
    poll_interval: float,
    first_pause: float = FIRST_PAUSE,
    progress: Callable[[float], None] | None = None,
) -> T | None:
    """Call ``attempt`` until it returns a result, or return None after ``timeout`` seconds.

    The caller made the first attempt, which failed: this starts with a pause. ``timeout``
    None waits forever. Between attempts ``pause(s)`` blocks up to ``s`` seconds; a backend
    with a wake-up returns early when the holder lets go.
    Pauses grow from ``first_pause`` (1 ms) to ``poll_interval`` and start over after an early
    wake-up, so a waiter retries within milliseconds of a release and costs almost nothing
    while it waits.
    ``progress(waited_seconds)`` is called about once a second while waiting.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    next_progress = start + PROGRESS_EVERY
    delay = first_pause
    while True:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return None
        step = delay if deadline is None else min(delay, deadline - now)
        pause(step)
        woke_early = time.monotonic() - now < step / 2
        delay = first_pause if woke_early else min(delay * 2, poll_interval)
        result = attempt()
        if result is not None:
            return result
        if progress is not None and time.monotonic() >= next_progress:
            progress(time.monotonic() - start)
            next_progress = time.monotonic() + PROGRESS_EVERY
