"""``locks status`` at scale (issue 19): 10,000 locks per strategy, listed by ``manage.py``.

A helper process (``python -m benchmarks.status hold COUNT``, this module) takes ``COUNT`` locks
through the strategy's backend and holds them (file: open flocked files, so its open-file limit
is raised; redis and database: leases of an hour, judged alive by its pid), prints ``held``,
and releases them all when its stdin closes. Then ``manage.py locks status`` and ``--json`` run
as subprocesses (the test suite's settings, the strategy through ``ISOLATABLE_TEST_SETTINGS``):
their wall time, and their peak RSS growth over the same command listing an empty store (the
child's ``VmHWM`` from /proc, written by a wrapper as it exits), so imports and Django's start
do not count.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from benchmarks import environment
from benchmarks.report import Group, Row, median, print_table

COUNT = 10_000
TTL = 3600.0  # seconds: the holder's leases outlive the measurement


@dataclass(frozen=True)
class Strategy:
    key: str
    title: str
    needs: tuple[str, ...]
    isolatable: dict[str, str] = field(default_factory=dict)


STRATEGIES = [
    Strategy("file", "file strategy", ()),
    Strategy("redis", "redis strategy", ("redis",)),
    Strategy(
        "database-postgres",
        "database strategy on PostgreSQL",
        ("postgres",),
        {"DATABASE_ALIAS": "postgres"},
    ),
]


@dataclass
class Listed:
    """One ``locks status`` run: wall seconds, peak RSS growth in MB, rows listed."""

    seconds: float
    growth_mb: float
    rows: int


def _settings(strategy: Strategy, prefix: str) -> dict[str, str]:
    from django.conf import settings

    return {
        "STRATEGY": strategy.key.split("-")[0],
        "LOCK_DIR": environment.work_file(f"status-{prefix}"),
        "KEY_PREFIX": environment.KEY_PREFIX + prefix + ":",
        "REDIS_URL": settings.ISOLATABLE["REDIS_URL"],
        **strategy.isolatable,
    }


def _env(isolatable: dict[str, str]) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "ISOLATABLE_TEST_SETTINGS": json.dumps(isolatable),
    }
    env.pop("COLUMNS", None)
    return env


#: ``manage.py`` run by a wrapper that writes its peak RSS (KiB) to the file named first: the
#: high-water mark of its own memory since exec (``VmHWM``), where ``ru_maxrss`` would also count
#: the copy of the forking parent (this process, which grows as it reads 10,000 rows).
MEASURED = """
import atexit, resource, runpy, sys
def report(path=sys.argv[1]):
    try:
        with open("/proc/self/status") as status:
            peak = next(line for line in status if line.startswith("VmHWM:")).split()[1]
    except (OSError, StopIteration):  # no /proc: the figure counts the fork too
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(path, "w") as out:
        out.write(str(peak))
atexit.register(report)
sys.argv = ["manage.py", *sys.argv[2:]]
runpy.run_path("manage.py", run_name="__main__")
"""


#: The admin's "Locks" page, rendered by Django's test client in a process of its own (the
#: suite's settings, an in-memory database with the admin's tables): the median of ``runs``
#: renders of its first page, in seconds, after one to warm up.
ADMIN = """
import json, statistics, sys, time
import django
django.setup()
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
call_command("migrate", verbosity=0, run_syncdb=True)
client = Client()
client.force_login(User.objects.create_superuser("bench", "bench@example.com", "bench"))
url = reverse("admin:django_isolatable_lockentry_changelist")
times = []
for _ in range(int(sys.argv[1]) + 1):
    started = time.perf_counter()
    response = client.get(url)
    times.append(time.perf_counter() - started)
    assert response.status_code == 200, response.status_code
print(json.dumps(statistics.median(times[1:])))
"""


def render_admin(env: dict[str, str], runs: int) -> float:
    """The admin "Locks" page's render time in seconds (median of ``runs``)."""
    result = subprocess.run(
        [sys.executable, "-c", ADMIN, str(runs)],
        cwd=environment.ROOT,
        env=env,
        capture_output=True,
        check=False,
        timeout=300,
    )
    if result.returncode:
        raise RuntimeError(f"the admin page failed:\n{result.stderr.decode()}")
    seconds: float = json.loads(result.stdout)
    return seconds


def list_locks(env: dict[str, str], *args: str) -> tuple[float, int, int]:
    """Run ``manage.py locks status *args``: wall seconds, peak RSS in KiB, lines or objects."""
    with tempfile.TemporaryDirectory() as directory:
        peak_file = os.path.join(directory, "peak")
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", MEASURED, peak_file, "locks", "status", *args],
            cwd=environment.ROOT,
            env=env,
            capture_output=True,
            check=False,
            timeout=120,
        )
        seconds = time.perf_counter() - started
        if result.returncode:
            raise RuntimeError(f"locks status {' '.join(args)} failed:\n{result.stderr.decode()}")
        with open(peak_file) as peak:
            kib = int(peak.read())
    out = result.stdout
    rows = len(json.loads(out)) if "--json" in args else max(out.count(b"\n") - 1, 0)
    return seconds, kib, rows


def _measure(strategy: Strategy, count: int, runs: int) -> dict[str, Listed]:
    empty = _env(_settings(strategy, f"{strategy.key}-empty"))
    full_settings = _settings(strategy, strategy.key)
    full = _env(full_settings)
    holder = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.status", "hold", str(count)],
        cwd=environment.ROOT,
        env=full,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    try:
        if holder.stdout.readline().strip() != "held":
            raise RuntimeError(f"the holder of {count} {strategy.key} locks did not start")
        measured = {}
        for label, args in (("table", ()), ("--json", ("--json",))):
            base = min(list_locks(empty, *args)[1] for _ in range(min(runs, 2)))
            trials = [list_locks(full, *args) for _ in range(runs)]
            seconds = median([t[0] for t in trials])
            growth = (max(t[1] for t in trials) - base) / 1024
            measured[label] = Listed(seconds, max(growth, 0.0), min(t[2] for t in trials))
        measured["admin"] = Listed(render_admin(full, max(runs, 3)), 0.0, 100)
        return measured
    finally:
        holder.stdin.close()
        holder.wait(timeout=300)


def run(count: int, runs: int) -> dict[str, Listed]:
    """Measure and print; the figures by "strategy/table" and "strategy/--json"."""
    results: dict[str, Listed] = {}
    group = Group(f"manage.py locks status with {count:,} locks held, median of {runs} runs")
    for strategy in STRATEGIES:
        missing = next(filter(None, map(environment.unavailable, strategy.needs)), None)
        if missing is not None:
            group.skipped.append(f"{strategy.title}: {missing}")
            continue
        for label, listed in _measure(strategy, count, runs).items():
            results[f"{strategy.key}/{label}"] = listed
            cells = [
                f"{listed.seconds * 1000:.0f} ms",
                "-" if label == "admin" else f"{listed.growth_mb:.1f} MB",
                str(listed.rows),
            ]
            what = "admin Locks page, first 100" if label == "admin" else label
            group.rows.append(Row(f"{strategy.title}, {what}", cells))
    headers = ["wall time", "RSS growth", "rows"]
    print_table("locks status at scale", headers, [group], ratios=False)
    return results


def hold(count: int) -> None:
    """Take ``count`` locks, say ``held``, release them when stdin closes."""
    import django

    django.setup()
    from django_isolatable.backends import backend_for
    from django_isolatable.holders import new_record

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, hard))
    backend = backend_for(None)
    ttl = TTL if backend.expiring else None
    leases = []
    try:
        for number in range(count):
            name = f"status-bench:{number:05d}"
            lease = backend.acquire(name, new_record(name, backend.strategy, ttl=ttl))
            if lease is None:
                raise RuntimeError(f"{name} is held already")
            leases.append(lease)
        print("held", flush=True)
        sys.stdin.read()
    finally:
        for lease in leases:
            backend.release(lease)


if __name__ == "__main__":  # `python -m benchmarks.status hold COUNT`, with the test settings
    hold(int(sys.argv[2]))
