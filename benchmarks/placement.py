"""Where the uncontended section runs: the benchmark on one CPU, the local servers on the others.

A round trip to a server on this machine costs what two processes on two CPUs cost, or much less
when the kernel happens to run the client and its server process on one CPU (on the 2-CPU VM of
docs/performance.md: 190 µs against 50 µs for a PostgreSQL statement). Which one a row got
changed from run to run and with it every ratio to the raw row, by up to 4x. Pinning makes each
row pay a cross-CPU round trip, as it does when the server is another machine, and the ratios
repeatable. The previous placement is restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

#: Process names (``/proc/<pid>/comm``) of the servers the benchmarks talk to.
SERVERS = ("redis-server", "postgres", "mariadbd", "mysqld")


def _server_threads() -> list[int]:
    """Thread ids of every running server process (new PostgreSQL backends inherit the
    postmaster's CPUs; MariaDB and Redis threads are pinned one by one)."""
    threads = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() in SERVERS:
                threads += [int(task.name) for task in (proc / "task").iterdir()]
        except OSError:
            continue
    return threads


@contextlib.contextmanager
def servers_apart() -> Iterator[str]:
    """Run the body on the first CPU with the servers on the others; yields what was done."""
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned (no sched_setaffinity here)"
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield "not pinned (one CPU)"
        return
    mine, theirs = {cpus[0]}, set(cpus[1:])
    saved: dict[int, set[int]] = {0: os.sched_getaffinity(0)}
    for tid in _server_threads():
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to move
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, theirs)
    moved = len(saved) - 1
    os.sched_setaffinity(0, mine)
    try:
        yield (
            f"this process on CPU {cpus[0]}, {moved} server threads on CPU "
            f"{','.join(map(str, sorted(theirs)))}"
            if moved
            else f"this process on CPU {cpus[0]} (no server threads could be moved)"
        )
    finally:
        for tid, cpus_before in saved.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus_before)
