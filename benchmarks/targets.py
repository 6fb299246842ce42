"""The issue's targets (issue 6), judged on whatever sections ran."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.report import Target, median

if TYPE_CHECKING:
    from benchmarks.contention import Outcome

DATABASES = (("postgres", "PostgreSQL"), ("mariadb", "MariaDB"), ("sqlite", "SQLite"))


@dataclass
class Results:
    """What the sections measured, keyed by "group key/row label"."""

    uncontended: dict[str, float] = field(default_factory=dict)  # median µs
    handoff: dict[str, list[float]] = field(default_factory=dict)  # ms per trial
    contention: dict[str, Outcome] = field(default_factory=dict)
    commands: dict[str, list[float]] = field(default_factory=dict)  # ms per run
    drivers: list[str] | None = None  # optional drivers the isolated no-op imported


def _relative(table: dict[str, float], mine: str, theirs: str) -> float | None:
    if mine not in table or theirs not in table:
        return None
    return table[mine] / table[theirs]


def _raw(table: dict[str, float], key: str, unit: str) -> str:
    """The raw limit's own figure, for a target that is absolute."""
    return f"(raw limit in this run: {table[key]:.2f}{unit})" if key in table else ""


def targets(results: Results) -> list[Target]:
    uncontended = results.uncontended
    handoff = {key: median(values) for key, values in results.handoff.items()}
    throughput = {key: outcome.throughput for key, outcome in results.contention.items()}
    file_contention = results.contention.get("file/file strategy")
    wall = results.commands
    drivers = results.drivers
    return [
        Target(
            "uncontended: file / filelock",
            _relative(uncontended, "file/file strategy", "file/filelock"),
            0.2,
            "x",
        ),
        Target(
            "uncontended: file / portalocker",
            _relative(uncontended, "file/file strategy", "file/portalocker"),
            1.0,
            "x",
        ),
        Target(
            "uncontended: memory / threading.Lock",
            _relative(uncontended, "memory/memory strategy", "memory/threading.Lock"),
            10,
            "x",
        ),
        Target(
            "uncontended: redis / raw SET NX PX + DEL",
            _relative(uncontended, "redis/redis strategy", "redis/raw SET NX PX + DEL"),
            1.2,
            "x",
        ),
        Target(
            "uncontended: postgres / raw advisory lock",
            _relative(
                uncontended, "postgres/postgres strategy", "postgres/raw try_advisory_lock + unlock"
            ),
            1.3,
            "x",
        ),
        *(
            Target(
                f"uncontended: database ({title}) / naive ORM",
                _relative(
                    uncontended,
                    f"rows:{alias}/database strategy",
                    f"rows:{alias}/naive ORM create() + delete()",
                ),
                1.0,
                "x",
            )
            for alias, title in DATABASES
        ),
        Target(
            "handoff p50: file",
            handoff.get("file/file strategy"),
            2,
            " ms",
            context=_raw(handoff, "file/raw blocking flock", " ms"),
        ),
        Target(
            "handoff p50: redis",
            handoff.get("redis/redis strategy"),
            1.5,
            " ms",
            context=_raw(handoff, "redis/raw SET NX + BLPOP wake-up", " ms"),
        ),
        Target(
            "handoff p50: postgres",
            handoff.get("postgres/postgres strategy"),
            1,
            " ms",
            context=_raw(handoff, "postgres/raw blocking pg_advisory_lock", " ms"),
        ),
        Target(
            "handoff p50: database (PostgreSQL)",
            handoff.get("postgres/database strategy (PostgreSQL)"),
            30,
            " ms",
        ),
        Target(
            "handoff p50: cache (RedisCache)",
            handoff.get("redis/cache strategy (Django RedisCache)"),
            30,
            " ms",
        ),
        Target(
            "contention: file / raw flock throughput",
            _relative(throughput, "file/file strategy", "file/raw blocking flock"),
            0.5,
            "x",
            at_most=False,
        ),
        Target(
            "contention: file worst wait",
            None if file_contention is None else file_contention.worst_wait,
            100,
            " ms",
        ),
        Target(
            "contention: redis / redis-py Lock throughput",
            _relative(throughput, "redis/redis strategy", "redis/redis-py Lock"),
            1.0,
            "x",
            at_most=False,
        ),
        Target(
            "contention: postgres / raw advisory throughput",
            _relative(
                throughput, "postgres/postgres strategy", "postgres/raw blocking pg_advisory_lock"
            ),
            0.8,
            "x",
            at_most=False,
        ),
        Target(
            "command: isolated - plain no-op (file)",
            median(wall["noop_isolated"]) - median(wall["noop_plain"]) if wall else None,
            15,
            " ms",
        ),
        Target(
            "command: optional drivers imported (file)",
            None if drivers is None else len(drivers),
            0,
            "",
            shown=None if drivers is None else ", ".join(drivers) or "none",
        ),
    ]
