"""Django signals sent by django-isolatable, on every path: ``IsolatableCommand``, ``isolated``,
``CommandIsolation.lock()`` and its async forms.

Each is sent with ``send_robust``: a receiver that raises is logged (by Django, on the
``django.dispatch`` logger) and never changes what happens to the lock. ``sender`` is the
``CommandIsolation`` the call went through; ``name`` is the lock's name as given (filter on it).
Durations are float seconds.
"""

from django.dispatch import Signal

#: A lock was taken. ``guard`` (LockGuard), ``waited`` (seconds spent in the lock call).
lock_acquired = Signal()

#: A held lock was released by its holder. ``guard``, ``held_for`` (seconds).
lock_released = Signal()

#: A lock call gave up without the lock (``AlreadyRunning`` or ``LockTimeout``, whether the
#: caller then skips or raises). ``holder`` (LockInfo of the holder, or None if unknown).
lock_skipped = Signal()

#: The lock of a dead holder (or an expired lease) was taken over. ``previous`` (its LockInfo).
lock_taken_over = Signal()

#: A held lock's lease was found expired or taken (from the renewal thread), or found gone at
#: release. ``guard``.
lock_lost = Signal()

#: A lock call gave up on a holder older than its maximum age (``MAX_AGE``, ``max_age``,
#: ``isolation_max_age``), right after ``lock_skipped``. ``holder``, ``age`` (seconds).
lock_overdue = Signal()
