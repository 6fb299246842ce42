"""Stress and crash runs for every cross-process strategy, checked by tests/history.py.

    python -m tests.stress stress [--workers 16] [--acquisitions 500] [--only NAME ...]
    python -m tests.stress crash [--rounds 50] [--only NAME ...]
    python -m tests.stress semaphore [--workers 16] [--acquisitions 200] [--max-holders 3]
    python -m tests.stress shared [--workers 16] [--acquisitions 200]
    python -m tests.stress starvation [--only NAME ...]

``stress``: N worker processes take one lock M times each, doing a racy read-modify-write of a
counter inside; prints a table (overlaps and lost updates must be 0). ``crash``: per round, two
workers take the lock in a loop and one is SIGKILLed at a random point (acquiring, holding or
releasing); the survivor must get the lock promptly, and no two sections may ever overlap.
``semaphore``: N workers take one ``max_holders=3`` semaphore M times each; inside, each claims
one of 3 slot files atomically (a 4th holder inside finds none free) and does a racy
read-modify-write of that slot's counter; never more than 3 inside, at least once 3, no lost
update per slot. ``shared``: a quarter of the workers take the lock exclusively (and update a
counter racily), the others shared; no exclusive section may overlap any other section, and
shared sections must overlap. ``starvation``: three workers keep overlapping shared holds
going without a gap; an exclusive ``lock(timeout=10)`` must still get in (writer preference).
Workers are forked from this process with the strategy's settings in place. Exit status 1 when
any run broke the guarantee. ``make stress`` runs the full size; ``make test`` a small one.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
# A session of its own (its keys, its SQLite file, which it deletes as it ends), not the one of
# the test run that may have started it: that one's SQLite file is still in use.
os.environ["ISOLATABLE_TEST_SESSION"] = f"stress-{os.getpid()}"

import django

django.setup()

from django.test import override_settings  # noqa: E402

from django_isolatable import CommandIsolation  # noqa: E402
from django_isolatable.backends import Shared  # noqa: E402
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


def slot_worker(lock: str, journal: Path, slots: Path, count: int, max_holders: int) -> None:
    """Take the ``max_holders`` semaphore ``lock`` ``count`` times; inside, claim a free slot
    file with O_EXCL (none free: one holder too many is inside), update its counter racily."""
    isolation = CommandIsolation(lock, max_holders=max_holders)
    for taken in range(count):
        with isolation.lock(timeout=120):
            start = time.monotonic()
            slot = _claim(slots, max_holders)
            if slot is not None:
                history.increment(slots / f"{slot}.counter")
                time.sleep(0.01)  # so that holders overlap, SQLite's serialised takes too
                os.unlink(slots / f"{slot}.claim")
            history.append(journal, f"{taken}:{slot}", os.getpid(), start, time.monotonic())


def _claim(slots: Path, count: int) -> int | None:
    for slot in range(count):
        try:
            os.close(os.open(slots / f"{slot}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return slot
    return None


def shared_worker(lock: str, journal: Path, counter: Path, count: int, shared: bool) -> None:
    """Take ``lock`` ``count`` times, shared or exclusively; an exclusive holder updates
    ``counter`` racily, a shared one only reads it."""
    isolation = CommandIsolation(lock)
    kind = "shared" if shared else "exclusive"
    for taken in range(count):
        with isolation.lock(timeout=120, shared=shared):
            start = time.monotonic()
            if shared:
                int(counter.read_text() or 0)
                time.sleep(0.002)
            else:
                history.increment(counter)
            history.append(journal, f"{taken}:{kind}", os.getpid(), start, time.monotonic())


def wait_all(pids: list[int]) -> list[int]:
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


@dataclass
class Outcome:
    target: str
    verdict: history.Verdict
    failures: list[str]
    #: crash runs: the longest a survivor took to get the lock after the other was killed;
    #: starvation runs: how long the exclusive locker waited
    slowest_recovery: float | None = None
    #: semaphore and shared runs: the most holders (shared holders) inside at once
    most_inside: int | None = None


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


def semaphore(
    target: Target, directory: Path, workers: int, acquisitions: int, max_holders: int
) -> Outcome:
    lock = f"semaphore-{uuid.uuid4().hex[:8]}"
    slots = directory / f"{target.name}-slots"
    slots.mkdir()
    for slot in range(max_holders):
        (slots / f"{slot}.counter").write_text("0")
    journals = [directory / f"{target.name}-{n}.journal" for n in range(workers)]
    pids = [
        fork(lambda j=j: slot_worker(lock, j, slots, acquisitions, max_holders)) for j in journals
    ]
    statuses = wait_all(pids)
    sections = history.read(journals)
    most, _ = history.most_inside(sections, lambda section: False)
    unclaimed = sum(section.worker.endswith(":None") for section in sections)
    counted = sum(int((slots / f"{n}.counter").read_text()) for n in range(max_holders))
    lost = len(sections) - unclaimed - counted
    verdict = _verdict(sections, overlaps=unclaimed, lost=lost)
    failures = [f"worker exit status {s}" for s in statuses if s]
    if len(sections) != workers * acquisitions:
        failures.append(f"{len(sections)} sections, expected {workers * acquisitions}")
    if most > max_holders or unclaimed:
        failures.append(f"{most} holders inside at once ({unclaimed} found no free slot)")
    if most < max_holders:
        failures.append(f"never {max_holders} holders inside at once (at most {most})")
    if lost:
        failures.append(f"{lost} lost updates")
    return Outcome(target.name, verdict, failures, most_inside=most)


def shared(target: Target, directory: Path, workers: int, acquisitions: int) -> Outcome:
    lock = f"shared-{uuid.uuid4().hex[:8]}"
    counter = directory / f"{target.name}.counter"
    counter.write_text("0")
    journals = [directory / f"{target.name}-{n}.journal" for n in range(workers)]
    pids = [
        fork(lambda j=j, n=n: shared_worker(lock, j, counter, acquisitions, n % 4 != 0))
        for n, j in enumerate(journals)
    ]
    statuses = wait_all(pids)
    sections = history.read(journals)
    exclusive = [s for s in sections if s.worker.endswith(":exclusive")]
    most_shared, _ = history.most_inside(
        [s for s in sections if s.worker.endswith(":shared")], lambda section: False
    )
    _, broken = history.most_inside(sections, lambda s: s.worker.endswith(":exclusive"))
    lost = len(exclusive) - int(counter.read_text() or 0)
    verdict = _verdict(sections, overlaps=broken, lost=lost)
    failures = [f"worker exit status {s}" for s in statuses if s]
    if len(sections) != workers * acquisitions:
        failures.append(f"{len(sections)} sections, expected {workers * acquisitions}")
    if broken:
        failures.append(f"{broken} exclusive sections overlapped another section")
    if most_shared < 2:
        failures.append("shared sections never overlapped")
    if lost:
        failures.append(f"{lost} lost updates")
    return Outcome(target.name, verdict, failures, most_inside=most_shared)


def starvation(target: Target, directory: Path) -> Outcome:
    """Three workers hold ``lock`` shared in turns that always overlap (each holds 0.3 s and
    takes it again at once); an exclusive ``lock(timeout=10)`` must get in."""
    lock = f"starve-{uuid.uuid4().hex[:8]}"
    journals = [directory / f"{target.name}-reader-{n}.journal" for n in range(3)]

    def reader(journal: Path, delay: float) -> None:
        time.sleep(delay)
        isolation = CommandIsolation(lock)
        for taken in itertools.count():
            with isolation.lock(timeout=60, shared=True):
                start = time.monotonic()
                time.sleep(0.3)
                history.append(journal, f"{taken}:shared", os.getpid(), start, time.monotonic())

    pids = [fork(lambda j=j, n=n: reader(j, n * 0.1)) for n, j in enumerate(journals)]
    failures = []
    waited = None
    try:
        _wait_for_section_after(journals[-1], 0.0, timeout=10)  # all three are going
        started = time.monotonic()
        with CommandIsolation(lock).lock(timeout=10):
            waited = time.monotonic() - started
            alone = time.monotonic()
            time.sleep(0.05)
            alone_until = time.monotonic()
    except Exception as e:
        failures.append(f"the exclusive locker did not get in: {type(e).__name__}: {e}")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_all(pids)
    sections = history.read(journals)
    if waited is not None:
        beside = [s for s in sections if s.start < alone_until and s.end > alone]
        if beside:
            failures.append(f"{len(beside)} shared sections overlapped the exclusive hold")
        most, _ = history.most_inside(sections, lambda section: False)
        if most < 2:
            failures.append("the shared holds never overlapped: nothing was tested")
    verdict = _verdict(sections, overlaps=0, lost=0)
    return Outcome(target.name, verdict, failures, slowest_recovery=waited)


def _verdict(sections: list[history.Section], overlaps: int, lost: int) -> history.Verdict:
    seconds = sections[-1].end - sections[0].start if sections else 0.0
    gaps = sorted(history.handoffs(sections)) or [0.0]
    return history.Verdict(
        sections=len(sections),
        overlaps=overlaps,
        lost_updates=lost,
        seconds=seconds,
        handoff_p50=statistics.median(gaps),
        handoff_p99=gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
    )


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


RUNS: dict[str, Callable[..., Outcome]] = {
    "stress": stress,
    "crash": crash,
    "semaphore": semaphore,
    "shared": shared,
    "starvation": starvation,
}


def run(mode: str, targets: list[Target], **sizes: int) -> tuple[list[Outcome], list[str]]:
    outcomes, refused = [], []
    with tempfile.TemporaryDirectory(prefix=f"isolatable-{mode}-") as directory:
        for target in targets:
            settings = {**target.settings, "TTL": target.ttl, "KEY_PREFIX": KEY_PREFIX}
            settings["LOCK_DIR"] = str(Path(directory) / "locks")
            with override_settings(ISOLATABLE=settings):
                if mode in ("shared", "starvation") and not isinstance(
                    CommandIsolation("probe").backend, Shared
                ):
                    refused.append(f"{target.name}: the strategy refuses shared locks")
                    continue
                outcomes.append(RUNS[mode](target, Path(directory), **sizes))
    return outcomes, refused


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


def _result(outcome: Outcome) -> str:
    return "ok" if not outcome.failures else "FAILED: " + "; ".join(outcome.failures)


def holders_table(outcomes: list[Outcome], mode: str) -> str:
    broken = "no slot" if mode == "semaphore" else "overlaps"
    most = "most inside" if mode == "semaphore" else "most shared"
    header = (
        f"{'strategy':<20} {'acquisitions':>12} {most:>11} {broken:>8} {'lost':>5} "
        f"{'acq/s':>8}  result"
    )
    lines = [header, "-" * len(header)]
    for outcome in outcomes:
        v = outcome.verdict
        lines.append(
            f"{outcome.target:<20} {v.sections:>12} {outcome.most_inside or 0:>11} "
            f"{v.overlaps:>8} {v.lost_updates:>5} {v.throughput:>8.0f}"
            f"  {_result(outcome)}"
        )
    return "\n".join(lines)


def starvation_table(outcomes: list[Outcome]) -> str:
    header = f"{'strategy':<20} {'shared holds':>12} {'exclusive waited':>16}  result"
    lines = [header, "-" * len(header)]
    for outcome in outcomes:
        waited = outcome.slowest_recovery
        shown = "-" if waited is None else f"{waited * 1000:.0f}ms"
        lines.append(
            f"{outcome.target:<20} {outcome.verdict.sections:>12} {shown:>16}  {_result(outcome)}"
        )
    return "\n".join(lines)


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
            f"  {_result(outcome)}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__)
    parser.add_argument("mode", choices=list(RUNS))
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--acquisitions", type=int, default=None, help="per worker (500; semaphore, shared: 200)"
    )
    parser.add_argument("--max-holders", type=int, default=3, help="semaphore runs")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", nargs="*", metavar="STRATEGY", help="e.g. file redis")
    args = parser.parse_args(argv)
    logging.getLogger("django_isolatable").setLevel(logging.ERROR)  # takeovers are the point
    targets, skipped = available(args.only)
    acquisitions = args.acquisitions or (500 if args.mode == "stress" else 200)
    sizes: dict[str, int] = {}
    if args.mode in ("stress", "semaphore", "shared"):
        sizes = {"workers": args.workers, "acquisitions": acquisitions}
        what = f" of a max_holders={args.max_holders} semaphore" * (args.mode == "semaphore")
        print(f"{args.mode}: {args.workers} processes x {acquisitions} acquisitions each{what}")
        if args.mode == "semaphore":
            sizes["max_holders"] = args.max_holders
    elif args.mode == "crash":
        seed = args.seed if args.seed is not None else random.randrange(2**32)
        sizes = {"rounds": args.rounds, "seed": seed}
        print(f"crash: {args.rounds} rounds per strategy, seed {seed} (--seed to replay)")
    else:
        print("starvation: three overlapping shared holders; an exclusive lock(timeout=10)")
    with services.left_as_found():
        outcomes, refused = run(args.mode, targets, **sizes)
    if args.mode in ("semaphore", "shared"):
        print(holders_table(outcomes, args.mode))
    elif args.mode == "starvation":
        print(starvation_table(outcomes))
    else:
        print(table(outcomes, crashes=args.mode == "crash"))
    for note in skipped + refused:
        print(f"skipped {note}")
    return 1 if any(outcome.failures for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
