"""Stress and crash runs for every cross-process strategy, checked by tests/history.py.

    python -m tests.stress stress [--workers 16] [--acquisitions 500] [--only NAME ...]
    python -m tests.stress crash [--rounds 50] [--only NAME ...]

``stress``: N worker processes take one lock M times each, doing a racy read-modify-write of a
counter inside; prints a table (overlaps and lost updates must be 0). ``crash``: per round, two
workers take the lock in a loop and one is SIGKILLed at a random point (acquiring, holding or
releasing); the survivor must get the lock promptly, and no two sections may ever overlap.
Workers are forked from this process with the strategy's settings in place. Exit status 1 when
any run broke the guarantee. ``make stress`` runs the full size; ``make test`` a small one.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django

django.setup()

from django.test import override_settings  # noqa: E402

from django_isolatable import CommandIsolation  # noqa: E402
from tests import history, services  # noqa: E402
from tests.settings import KEY_PREFIX  # noqa: E402


@dataclass(frozen=True)
class Target:
    """A strategy as the stress runs use it: its settings and the server it needs."""

    name: str
    settings: dict[str, object]
    service: str | None = None
    ttl: float = field(default=30.0)


TARGETS = [
    Target("file", {"STRATEGY": "file"}),
    Target("redis", {"STRATEGY": "redis", "REDIS_URL": services.REDIS_URL}, "redis"),
    Target("postgres", {"STRATEGY": "postgres", "DATABASE_ALIAS": "postgres"}, "postgres"),
    Target("database-postgres", {"STRATEGY": "database", "DATABASE_ALIAS": "postgres"}, "postgres"),
    Target("database-mariadb", {"STRATEGY": "database", "DATABASE_ALIAS": "mariadb"}, "mariadb"),
    Target("database-sqlite", {"STRATEGY": "database", "DATABASE_ALIAS": "sqlite"}),
    Target("cache-redis", {"STRATEGY": "cache", "CACHE_ALIAS": "redis"}, "redis"),
]


def fork(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked child that exits without running this process's cleanups."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            work()
        except BaseException as e:
            print(f"worker {os.getpid()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            status = 1
        os._exit(status)
    return pid


def worker(lock: str, journal: Path, counter: Path, count: int | None, hold: float) -> None:
    """Take ``lock`` ``count`` times (or until killed), journaling each critical section."""
    isolation = CommandIsolation(lock)
    taken = 0
    while count is None or taken < count:
        with isolation.lock(timeout=120):
            start = time.monotonic()
            history.increment(counter)
            if hold:
                time.sleep(hold)
            history.append(journal, str(taken), os.getpid(), start, time.monotonic())
        taken += 1


def wait_all(pids: list[int]) -> list[int]:
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


@dataclass
class Outcome:
    target: str
    verdict: history.Verdict
    failures: list[str]
    #: crash runs: the longest a survivor took to get the lock after the other was killed
    slowest_recovery: float | None = None


def stress(target: Target, directory: Path, workers: int, acquisitions: int) -> Outcome:
    lock = f"stress-{uuid.uuid4().hex[:8]}"
    counter = directory / f"{target.name}.counter"
    counter.write_text("0")
    journals = [directory / f"{target.name}-{n}.journal" for n in range(workers)]
    pids = [
        fork(lambda journal=journal: worker(lock, journal, counter, acquisitions, 0.0))
        for journal in journals
    ]
    statuses = wait_all(pids)
    verdict = history.check(journals, counter)
    failures = [f"worker exit status {s}" for s in statuses if s]
    if verdict.sections != workers * acquisitions:
        failures.append(f"{verdict.sections} sections, expected {workers * acquisitions}")
    if verdict.overlaps:
        failures.append(f"{verdict.overlaps} overlapping sections")
    if verdict.lost_updates:
        failures.append(f"{verdict.lost_updates} lost updates")
    return Outcome(target.name, verdict, failures)


def crash(target: Target, directory: Path, rounds: int, seed: int) -> Outcome:
    """``rounds`` rounds of: two looping workers, one SIGKILLed at a random point; the survivor
    must take the lock again promptly. Then the lock must be free to the test process at once."""
    rng = random.Random(seed)
    lock = f"crash-{uuid.uuid4().hex[:8]}"
    counter = directory / f"{target.name}.counter"
    counter.write_text("0")
    journals: list[Path] = []
    failures: list[str] = []
    recoveries: list[float] = []
    for round_ in range(rounds):
        pair = [directory / f"{target.name}-{round_}-{n}.journal" for n in range(2)]
        journals += pair
        pids = [fork(lambda j=j: worker(lock, j, counter, None, 0.001)) for j in pair]
        time.sleep(rng.uniform(0.05, 0.3))  # at a random point of the victim's loop
        victim, survivor = rng.sample(range(2), 2)
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        recovered = _wait_for_section_after(pair[survivor], killed_at, timeout=10)
        os.kill(pids[survivor], signal.SIGKILL)
        wait_all(pids)
        if recovered is None:
            failures.append(f"round {round_}: the survivor never took the lock again")
        else:
            recoveries.append(recovered)
        started = time.monotonic()
        try:
            CommandIsolation(lock).lock(timeout=10).release()  # both dead: free at once
        except Exception as e:
            failures.append(f"round {round_}: after both were killed: {e}")
        else:
            if time.monotonic() - started > 5:
                failures.append(
                    f"round {round_}: free only after {time.monotonic() - started:.1f} s"
                )
    verdict = history.check(journals, counter)  # (killed writers tear the counter: not checked)
    if verdict.overlaps:
        failures.append(f"{verdict.overlaps} overlapping sections")
    return Outcome(target.name, verdict, failures, max(recoveries, default=None))


def _wait_for_section_after(journal: Path, moment: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sections = history.read([journal])
        after = [section.start for section in sections if section.start > moment]
        if after:
            return min(after) - moment
        time.sleep(0.01)
    return None


def run(mode: str, targets: list[Target], **sizes: int) -> list[Outcome]:
    outcomes = []
    with tempfile.TemporaryDirectory(prefix=f"isolatable-{mode}-") as directory:
        for target in targets:
            settings = {**target.settings, "TTL": target.ttl, "KEY_PREFIX": KEY_PREFIX}
            settings["LOCK_DIR"] = str(Path(directory) / "locks")
            with override_settings(ISOLATABLE=settings):
                if mode == "stress":
                    outcomes.append(stress(target, Path(directory), **sizes))
                else:
                    outcomes.append(crash(target, Path(directory), **sizes))
    return outcomes


def available(only: list[str] | None) -> tuple[list[Target], list[str]]:
    chosen, skipped = [], []
    for target in TARGETS:
        if only and target.name not in only:
            continue
        if target.service and not services.reachable(target.service):
            if os.environ.get("ISOLATABLE_REQUIRE_SERVICES") == "1":
                chosen.append(target)  # and let it fail loudly
            else:
                skipped.append(f"{target.name}: {target.service} is not reachable")
            continue
        chosen.append(target)
    return chosen, skipped


def table(outcomes: list[Outcome], crashes: bool) -> str:
    last = "recovery max" if crashes else "lost"
    header = (
        f"{'strategy':<20} {'acquisitions':>12} {'overlaps':>8} {last:>12} {'acq/s':>8} "
        f"{'handoff p50':>12} {'p99':>9}  result"
    )
    lines = [header, "-" * len(header)]
    for outcome in outcomes:
        v = outcome.verdict
        if crashes:
            slowest = outcome.slowest_recovery
            extra = "-" if slowest is None else f"{slowest * 1000:.0f}ms"
        else:
            extra = str(v.lost_updates)
        lines.append(
            f"{outcome.target:<20} {v.sections:>12} {v.overlaps:>8} {extra:>12} "
            f"{v.throughput:>8.0f} {v.handoff_p50 * 1000:>10.2f}ms {v.handoff_p99 * 1000:>7.2f}ms"
            f"  {'ok' if not outcome.failures else 'FAILED: ' + '; '.join(outcome.failures)}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__)
    parser.add_argument("mode", choices=["stress", "crash"])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--acquisitions", type=int, default=500, help="per worker")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", nargs="*", metavar="STRATEGY", help="e.g. file redis")
    args = parser.parse_args(argv)
    logging.getLogger("django_isolatable").setLevel(logging.ERROR)  # takeovers are the point
    targets, skipped = available(args.only)
    if args.mode == "stress":
        sizes = {"workers": args.workers, "acquisitions": args.acquisitions}
        print(f"stress: {args.workers} processes x {args.acquisitions} acquisitions each")
    else:
        seed = args.seed if args.seed is not None else random.randrange(2**32)
        sizes = {"rounds": args.rounds, "seed": seed}
        print(f"crash: {args.rounds} rounds per strategy, seed {seed} (--seed to replay)")
    with services.left_as_found():
        outcomes = run(args.mode, targets, **sizes)
    print(table(outcomes, crashes=args.mode == "crash"))
    for note in skipped:
        print(f"skipped {note}")
    return 1 if any(outcome.failures for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
