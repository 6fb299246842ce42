"""`make demo`: the example project's isolated command, started twice at once.

Every step prints the command it runs, so the transcript reads like a terminal session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, "manage.py"]
ENV = {**os.environ, "DJANGO_SETTINGS_MODULE": "example_project.settings"}


def say(text: str) -> None:
    print(f"\n\033[1m# {text}\033[0m" if sys.stdout.isatty() else f"\n# {text}", flush=True)


def run(*args: str) -> int:
    print("$ python manage.py " + " ".join(args), flush=True)
    return subprocess.run([*MANAGE, *args], cwd=ROOT, env=ENV, check=False).returncode


def wait_until_held(name: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(ENV)
    import django

    django.setup()
    from django_isolatable import CommandIsolation

    isolation = CommandIsolation(name)
    deadline = time.monotonic() + 30
    while not isolation.is_locked():
        if time.monotonic() > deadline:
            raise SystemExit(f"the first {name} never took its lock")
        time.sleep(0.05)


def main() -> None:
    say("Start import_data in the background (it works for 4 seconds).")
    print("$ python manage.py import_data --seconds 4 &", flush=True)
    first = subprocess.Popen([*MANAGE, "import_data", "--seconds", "4"], cwd=ROOT, env=ENV)
    wait_until_held("import_data")

    say("Cron starts a second copy while the first runs: it is skipped, handle() never runs.")
    status = run("import_data", "--seconds", "4", "--isolated-exit-code", "75")
    print(f"(exit status {status}: the --isolated-exit-code we asked for)", flush=True)

    say("What operators see meanwhile:")
    run("locks", "status")

    say("A deploy hook would rather wait for it than skip:")
    run("import_data", "--seconds", "0.5", "--wait", "30")
    first.wait()

    say("Both runs are over, so the lock is free again:")
    run("locks", "status", "import_data")

    say("A run killed with kill -9 cannot clean up; the kernel freed its lock, its record stays:")
    print("$ python manage.py import_data --seconds 60 & kill -9 $!", flush=True)
    victim = subprocess.Popen(
        [*MANAGE, "import_data", "--seconds", "60"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL
    )
    wait_until_held("import_data")
    victim.kill()
    victim.wait()
    run("locks", "status")
    run("locks", "release", "import_data")


if __name__ == "__main__":
    main()
