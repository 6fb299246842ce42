"""A plain command that does nothing: `benchmarks/run.py` times it against noop_isolated."""

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Do nothing (the benchmarks' baseline for noop_isolated)."

    def handle(self, *args, **options):
        pass
