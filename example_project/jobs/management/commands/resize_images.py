"""Image resizing that may run twice at once, not more: `manage.py resize_images --seconds 30`."""

import time

from django_isolatable import IsolatableCommand


class Command(IsolatableCommand):
    help = "Resize uploaded images (simulated with --seconds of work); at most two runs at once."
    isolation_max_holders = 2

    def add_arguments(self, parser):
        parser.add_argument("--seconds", type=float, default=5.0, help="How long the work takes.")

    def handle(self, *args, **options):
        self.stdout.write(f"resize_images: resizing for {options['seconds']:g} s...")
        deadline = time.monotonic() + options["seconds"]
        while time.monotonic() < deadline:
            time.sleep(0.05)
        self.stdout.write(self.style.SUCCESS("resize_images: done."))
