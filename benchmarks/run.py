"""Benchmarks of django-isolatable: `python benchmarks/run.py` (or `make bench`) prints tables.

First the round trips of the redis and postgres strategies' operations, counted on the wire;
then five timed sections, each next to the raw limit of the same run (the ``x raw`` column) and
next to the peers: uncontended acquire+release, the ``isolated`` decorator against a direct
``try_lock()``, handoff latency between processes, 8 processes contending for one lock, and the
overhead of an isolated management command; then semaphore slots and shared holds against the
plain lock of each strategy, uncontended and handed off (``--only holders``); then ``locks
status`` and ``--json`` with 10,000 locks held per strategy (``--only status``). Ratios are what to
compare: the machine is noisy, ratios much less so. Rows whose server or peer is missing are
skipped with a note. The issue's targets end the run, in one table. ``--quick`` is a smoke run
of a few seconds.

Async code (``--only async``): the event loop's lag while coroutines wait on ``alock()``
for locks another process holds, and the handoff to an ``alock()`` waiter.

Redis high availability (``--only redis-ha``, last): lock + release through Sentinel and on a
Cluster against plain Redis, and one failover's figures, on topologies the run starts itself.

Exit status 1 if a measurement failed or a lock let two processes in at once (a contention
counter did not end exact); a missed target is reported, not failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import environment
from benchmarks.report import print_targets
from benchmarks.targets import Results, targets

SECTIONS = (
    "round-trips",
    "uncontended",
    "decorator",
    "handoff",
    "contention",
    "commands",
    "holders",
    "status",
    "async",
    "redis-ha",
)
FULL = {
    "round_trip_trials": 10,
    "batches": 30,
    "batch_ms": 40.0,
    "trials": 40,
    "acquisitions": 500,
    "rounds": 3,
    "runs": 20,
    "lag_seconds": 3.0,
    "holder_batches": 30,
    "holder_trials": 40,
    "status_locks": 10_000,
    "status_runs": 3,
}
QUICK = {
    "round_trip_trials": 2,
    "batches": 5,
    "batch_ms": 10.0,
    "trials": 3,
    "acquisitions": 20,
    "rounds": 1,
    "runs": 2,
    "lag_seconds": 0.2,
    "holder_batches": 2,  # 24 rows of each: the smallest smoke run
    "holder_trials": 1,
    "status_locks": 200,
    "status_runs": 1,
}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run (well under 30 s)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument(
        "--round-trip-trials", type=int, help="round trips: counted trials per strategy (10)"
    )
    parser.add_argument("--batches", type=int, help="uncontended, decorator: batches per row (30)")
    parser.add_argument("--batch-ms", type=float, help="uncontended, decorator: ms per batch (40)")
    parser.add_argument("--trials", type=int, help="handoff: trials per row (40)")
    parser.add_argument("--processes", type=int, default=8, help="contention: processes (8)")
    parser.add_argument("--acquisitions", type=int, help="contention: per process (500)")
    parser.add_argument("--rounds", type=int, help="contention: rounds per group (3)")
    parser.add_argument("--runs", type=int, help="commands: runs of each command (20)")
    parser.add_argument(
        "--lag-seconds", type=float, help="async: seconds of loop ticks per lag row (3)"
    )
    parser.add_argument(
        "--holder-batches", type=int, help="holders: uncontended batches per row (30)"
    )
    parser.add_argument("--holder-trials", type=int, help="holders: handoff trials per row (40)")
    parser.add_argument("--status-locks", type=int, help="status: locks held per strategy (10,000)")
    parser.add_argument("--status-runs", type=int, help="status: runs of each listing (3)")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main() -> int:
    args = _arguments()
    began = time.monotonic()
    failed = False
    results = Results()
    with tempfile.TemporaryDirectory(prefix="isolatable-bench-") as directory:
        environment.configure(Path(directory))
        from benchmarks import commands, contention, decorator, handoff, roundtrips, uncontended

        now = datetime.datetime.now().astimezone()
        print(f"django-isolatable benchmarks, {now:%Y-%m-%d %H:%M %Z}")
        print(f"$ python benchmarks/run.py {' '.join(sys.argv[1:])}".rstrip())
        print(f"django-isolatable at commit {environment.commit()}")
        print(
            f"Python {platform.python_version()} on {platform.system()} {platform.release()}, "
            f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); "
            f"{environment.versions()}"
        )

        def run_commands() -> None:
            results.commands, results.drivers = commands.run(args.runs)

        def run_async() -> None:
            from benchmarks import eventloop

            results.loop_lag, results.async_handoff = eventloop.run(
                args.trials, args.lag_seconds, 0.05 if args.quick else 0.25
            )

        def run_holders() -> None:
            from benchmarks import holders

            results.holders = holders.run(
                args.holder_batches,
                args.batch_ms / 1000,
                args.holder_trials,
                0.05 if args.quick else 0.25,
            )

        def run_status() -> None:
            from benchmarks import status

            results.status = status.run(args.status_locks, args.status_runs)

        def run_redis_ha() -> None:
            from benchmarks import redisha

            redisha.run(args.batches, args.batch_ms / 1000)

        sections = {
            "round-trips": lambda: setattr(
                results, "trips", roundtrips.run(args.round_trip_trials)
            ),
            "uncontended": lambda: setattr(
                results, "uncontended", uncontended.run(args.batches, args.batch_ms / 1000)
            ),
            "decorator": lambda: setattr(
                results, "decorator", decorator.run(args.batches, args.batch_ms / 1000)
            ),
            "handoff": lambda: setattr(
                results, "handoff", handoff.run(args.trials, 0.05 if args.quick else 0.25)
            ),
            "contention": lambda: setattr(
                results,
                "contention",
                contention.run(args.processes, args.acquisitions, args.rounds),
            ),
            "commands": run_commands,
            "holders": run_holders,
            "status": run_status,
            "async": run_async,
            "redis-ha": run_redis_ha,
        }
        try:
            for name in args.only:
                try:
                    sections[name]()
                except Exception:
                    failed = True
                    print(f"\n{name}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
            if any(not outcome.exact for outcome in results.contention.values()):
                failed = True
                print("\nA lock let two processes in at once: see 'exact' above.", file=sys.stderr)
            smoke = ": a --quick run is too short to judge the timed ones" if args.quick else ""
            print_targets(targets(results), smoke)
        finally:
            environment.leave_as_found()
    took = time.monotonic() - began
    print(f"\nFinished in {took:.0f} s (load average {os.getloadavg()[0]:.1f}).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
