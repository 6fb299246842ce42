"""Django signals sent by django-isolatable."""

from django.dispatch import Signal

#: Sent from the heartbeat thread when a held lock's lease is found expired or taken.
#: Arguments: ``sender`` (CommandIsolation), ``name`` (the lock name), ``guard`` (its LockGuard).
lock_lost = Signal()
