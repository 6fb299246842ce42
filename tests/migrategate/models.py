from django.db import models


class Ticket(models.Model):
    """A table that exists only once the gate was passed."""
