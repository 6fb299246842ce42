"""`make demo`: two processes contend for one CommandIsolation file lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOLDER = """
import time, django
django.setup()
from django_isolatable import CommandIsolation
with CommandIsolation("nightly-report").lock():
    print("  [first]  took the lock, working for 3 seconds...", flush=True)
    time.sleep(3)
    print("  [first]  done, releasing", flush=True)
"""
SECOND = """
import time, django
django.setup()
from django_isolatable import AlreadyRunning, CommandIsolation
isolation = CommandIsolation("nightly-report")
try:
    isolation.try_lock()
except AlreadyRunning as e:
    print(f"  [second] try_lock(): {e}", flush=True)
print(f"  [second] lock file {isolation.lock_path()} says:")
print("    " + isolation.lock_path().read_text().strip()[:200] + "...", flush=True)
print("  [second] waiting with lock(timeout=10)...", flush=True)
started = time.monotonic()
with isolation.lock(timeout=10):
    print(f"  [second] got it after {time.monotonic() - started:.2f} s", flush=True)
"""


def main() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "example_project.settings"}
    print("Two processes want the lock 'nightly-report' (file strategy, no server needed):")
    first = subprocess.Popen([sys.executable, "-c", HOLDER], cwd=ROOT, env=env)
    time.sleep(1)
    subprocess.run([sys.executable, "-c", SECOND], cwd=ROOT, env=env, check=True)
    first.wait()


if __name__ == "__main__":
    main()
