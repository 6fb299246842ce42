"""The database strategy's table. Unmanaged, with no migration: the backend creates the table
itself when it is missing, so isolating ``migrate`` works on a brand-new empty database."""

from django.db import models


class Lock(models.Model):
    """One held (or expired, not yet taken over) lock of the database strategy: a plain lock's
    holder, or a semaphore's main row (which holds the name while it has slots) or one of its
    slot rows (one per holder)."""

    #: SHA-256 of KEY_PREFIX + name, hex: a fixed-size unique key for names of any length.
    name_hash = models.CharField(max_length=64, primary_key=True)
    name = models.TextField()
    token = models.CharField(max_length=64)
    pid = models.IntegerField(null=True)
    hostname = models.CharField(max_length=255)
    host_id = models.CharField(max_length=255)
    process_started_at = models.DateTimeField(null=True)
    acquired_at = models.DateTimeField(null=True)
    argv = models.TextField()  # JSON list
    label = models.CharField(max_length=200, null=True)
    #: ``"exclusive"``, or ``"semaphore"`` for a semaphore's slot rows and its main row (NULL in
    #: rows of earlier versions: exclusive).
    mode = models.CharField(max_length=16, null=True)
    #: The holder count the holder's lock allows (NULL in rows of earlier versions: 1).
    max_holders = models.IntegerField(null=True)
    #: A semaphore slot row's name key (the ``name_hash`` of its main row), else NULL.
    lock_hash = models.CharField(max_length=64, null=True, db_index=True)
    #: The fencing token the holder was issued, NULL until it read one (and in earlier rows).
    fencing_token = models.BigIntegerField(null=True)
    #: Judged by the database server's clock, never a client's.
    expires_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "django_isolatable_lock"
        app_label = "django_isolatable"

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid} on {self.hostname})"


class PeriodRun(models.Model):
    """One period's successful run of a ``once_per`` lock (database and postgres strategies):
    the holder record of the run that used the period, kept until the period is over."""

    #: SHA-256 of KEY_PREFIX, name, period length and period, hex.
    period_key = models.CharField(max_length=64, primary_key=True)
    name = models.TextField()
    period_seconds = models.FloatField()
    period_index = models.BigIntegerField()
    record = models.TextField()  # the holder record as JSON
    #: The period's end plus a margin, on the database server's clock: the row may go then.
    expires_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "django_isolatable_period"
        app_label = "django_isolatable"

    def __str__(self) -> str:
        return f"{self.name} ran in period {self.period_index} of {self.period_seconds:g} s"


class Fence(models.Model):
    """The greatest fencing token ``fence()`` recorded for a lock name, in the caller's
    database: a transaction that fences a smaller one cannot commit."""

    #: SHA-256 of KEY_PREFIX + name, hex, as the lock table's key.
    name_hash = models.CharField(max_length=64, primary_key=True)
    name = models.TextField()
    token = models.BigIntegerField()
    #: The database server's time of the fence that recorded ``token``.
    fenced_at = models.DateTimeField()

    class Meta:
        managed = False
        db_table = "django_isolatable_fence"
        app_label = "django_isolatable"

    def __str__(self) -> str:
        return f"{self.name} fenced token {self.token}"


class FencingCount(models.Model):
    """The last fencing token the database and postgres strategies issued for a lock name."""

    #: SHA-256 of KEY_PREFIX + name, hex, as the lock table's key.
    name_hash = models.CharField(max_length=64, primary_key=True)
    name = models.TextField()
    token = models.BigIntegerField()

    class Meta:
        managed = False
        db_table = "django_isolatable_fencing"
        app_label = "django_isolatable"

    def __str__(self) -> str:
        return f"{self.name}: token {self.token}"


class LockEntry(models.Model):
    """No table: the admin's "Locks" page (``django_isolatable.admin``) and the permission
    ``django_isolatable.release_lock`` it asks for. Its rows come from the strategy's
    ``list()``; Django creates the permission after ``migrate`` as for any model."""

    name = models.TextField(primary_key=True)

    class Meta:
        managed = False
        db_table = "django_isolatable_lockentry"  # never created
        app_label = "django_isolatable"
        default_permissions = ()
        permissions = (("release_lock", "Can release locks"),)
        verbose_name = "lock"
        verbose_name_plural = "locks"

    def __str__(self) -> str:
        return self.name
