"""The issues' targets (issue 15, "Speed: what counts now"; issue 16, the decorator's overhead;
issue 17, semaphores and shared locks; issue 19, ``locks status`` at scale), judged on whatever
sections ran."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.report import Target, median, percentile

if TYPE_CHECKING:
    from benchmarks.contention import Outcome
    from benchmarks.holders import Measured
    from benchmarks.status import Listed

#: (operation, what the target calls it): one round trip each, none for a woken waiter.
ROUND_TRIPS = (
    ("acquire", "uncontended acquire", 1),
    ("release", "release", 1),
    ("renewal", "renewal", 1),
    ("wake-up", "woken waiter after the release", 0),
)


@dataclass
class Results:
    """What the sections measured, keyed by "group key/row label"."""

    trips: dict[str, int] = field(default_factory=dict)  # by "server/operation"
    uncontended: dict[str, float] = field(default_factory=dict)  # median µs
    decorator: dict[str, float] = field(default_factory=dict)  # median µs
    handoff: dict[str, list[float]] = field(default_factory=dict)  # ms per trial
    contention: dict[str, Outcome] = field(default_factory=dict)
    commands: dict[str, list[float]] = field(default_factory=dict)  # ms per run
    drivers: list[str] | None = None  # optional drivers the isolated no-op imported
    loop_lag: dict[str, list[float]] = field(default_factory=dict)  # ms per tick
    async_handoff: dict[str, list[float]] = field(default_factory=dict)  # ms per trial
    holders: Measured | None = None  # semaphore slots and shared holds
    status: dict[str, Listed] = field(default_factory=dict)  # by "strategy/table|--json"


def _relative(table: dict[str, float], mine: str, theirs: str) -> float | None:
    if mine not in table or theirs not in table:
        return None
    return table[mine] / table[theirs]


def _raw(table: dict[str, float], key: str, unit: str) -> str:
    """The raw limit's own figure, for a target that is absolute."""
    return f"(raw limit in this run: {table[key]:.2f}{unit})" if key in table else ""


def _round_trips(trips: dict[str, int]) -> list[Target]:
    targets = []
    for server in ("redis", "postgres"):
        for operation, what, limit in ROUND_TRIPS:
            count = trips.get(f"{server}/{operation}")
            shown = None if count is None else str(count)
            targets.append(
                Target(f"round trips: {server} {what}", count, limit, "", "=", shown=shown)
            )
    return targets


#: Issue 16: (group, strategy row label, handoff p50 goal in ms).
ASYNC_GOALS = (
    ("file", "file strategy", 2.0),
    ("redis", "redis strategy", 1.5),
    ("postgres", "postgres strategy", 1.0),
)
LAG_P99_GOAL = 2.0  # ms


def _async(results: Results) -> list[Target]:
    """Issue 16: the loop's lag p99 while 8 coroutines wait, the handoff to an alock() waiter;
    next to the idle loop's lag, the lag with the waiters in another process, and a lock()
    waiter's handoff, of the same run."""
    lag = {key: percentile(values, 0.99) for key, values in results.loop_lag.items()}
    handoff = {key: median(values) for key, values in results.async_handoff.items()}
    found = []
    for group, label, _ in ASYNC_GOALS:
        idle, elsewhere = lag.get(f"{group}/idle loop"), lag.get(f"{group}/{label}, elsewhere")
        context = (
            ""
            if idle is None or elsewhere is None
            else f"(idle loop: {idle:.2f} ms; the waiters in another process: {elsewhere:.2f} ms)"
        )
        found.append(
            Target(
                f"loop lag p99, 8 alock() waiters: {group} (issue 16)",
                lag.get(f"{group}/{label}"),
                LAG_P99_GOAL,
                " ms",
                context=context,
            )
        )
    for group, label, goal in ASYNC_GOALS:
        sync = handoff.get(f"{group}/{label}")
        found.append(
            Target(
                f"alock() handoff p50: {group} (issue 16)",
                handoff.get(f"{group}/alock(), {label}"),
                goal,
                " ms",
                context="" if sync is None else f"(lock() in this run: {sync:.2f} ms)",
            )
        )
    return found


#: Issue 17: a semaphore slot or a shared hold costs at most this times the plain lock.
HOLDERS_WITHIN = 1.5


def _holders(measured: Measured | None) -> list[Target]:
    """Issue 17, per strategy: a semaphore slot and a shared hold against the plain lock,
    uncontended and handed off (a shared hold's handoff: the slower of its two ways)."""
    from benchmarks import holders  # imports the strategies: only once Django is configured

    measured = measured or holders.Measured()
    handoff = {key: median(values) for key, values in measured.handoff.items()}
    found = []
    for strategy in holders.STRATEGIES:
        judged = [
            ("semaphore slot / plain, uncontended", measured.uncontended, [holders.SLOT.label]),
            ("shared hold / plain, uncontended", measured.uncontended, [holders.SHARED.label]),
        ]
        if strategy.across_processes:
            judged += [
                ("last slot / plain, handoff p50", handoff, [holders.LAST_SLOT.label]),
                ("shared / plain, handoff p50 (slower way)", handoff, list(holders.SHARED_WAYS)),
            ]
        for what, table, labels in judged:
            unit, digits = (" ms", 2) if table is handoff else (" µs", 1)
            plain = table.get(f"{strategy.key}/{holders.PLAIN.label}")
            rows = {label: table.get(f"{strategy.key}/{label}") for label in labels}
            figures = [figure for figure in rows.values() if figure is not None]
            context = [] if plain is None else [f"plain lock: {plain:.{digits}f}{unit}"]
            if len(figures) > 1:
                context += [f"{label}: {figure:.{digits}f}{unit}" for label, figure in rows.items()]
            found.append(
                Target(
                    f"holders (issue 17): {strategy.key} {what}",
                    None if plain is None or len(figures) < len(rows) else max(figures) / plain,
                    HOLDERS_WITHIN,
                    "x",
                    context=f"({'; '.join(context)})" if context else "",
                    refused=any(f"{strategy.key}/{label}" in measured.refused for label in labels),
                )
            )
    return found


def _status(listed: dict[str, Listed]) -> list[Target]:
    """Issue 19: ``locks status`` and ``--json`` with 10,000 locks, under 1 s and 50 MB; the
    admin's Locks page with as many, under 300 ms."""
    targets = []
    for strategy in ("file", "redis", "database-postgres"):
        for output in ("table", "--json"):
            found = listed.get(f"{strategy}/{output}")
            what = f"locks status (issue 19): {strategy}, {output}"
            targets += [
                Target(f"{what}, wall time", None if found is None else found.seconds, 1, " s"),
                Target(
                    f"{what}, peak RSS growth",
                    None if found is None else found.growth_mb,
                    50,
                    " MB",
                ),
            ]
        admin = listed.get(f"{strategy}/admin")
        targets.append(
            Target(
                f"admin Locks page (issue 19): {strategy}, render of a page of 100",
                None if admin is None else admin.seconds * 1000,
                300,
                " ms",
            )
        )
    return targets


def targets(results: Results) -> list[Target]:
    uncontended = results.uncontended
    handoff = {key: median(values) for key, values in results.handoff.items()}
    throughput = {key: outcome.throughput for key, outcome in results.contention.items()}
    wall = results.commands
    drivers = results.drivers
    return [
        *_round_trips(results.trips),
        Target(
            "handoff p50: file",
            handoff.get("file/file strategy"),
            0.5,
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
            "contention: redis / redis-py Lock throughput",
            _relative(throughput, "redis/redis strategy", "redis/redis-py Lock"),
            0.9,
            "x",
            ">=",
        ),
        Target(
            "contention: postgres / raw advisory throughput",
            _relative(
                throughput, "postgres/postgres strategy", "postgres/raw blocking pg_advisory_lock"
            ),
            0.8,
            "x",
            ">=",
        ),
        Target(
            "contention: file / filelock throughput",
            _relative(throughput, "file/file strategy", "file/filelock"),
            4,
            "x",
            ">=",
        ),
        Target(
            "uncontended: redis / raw SET NX PX + DEL",
            _relative(uncontended, "redis/redis strategy", "redis/raw SET NX PX + DEL"),
            1.5,
            "x",
        ),
        Target(
            "uncontended: postgres / raw advisory lock",
            _relative(
                uncontended, "postgres/postgres strategy", "postgres/raw try_advisory_lock + unlock"
            ),
            1.5,
            "x",
        ),
        Target(
            "uncontended: file / filelock",
            _relative(uncontended, "file/file strategy", "file/filelock"),
            0.2,
            "x",
        ),
        *(
            Target(
                f"decorator (issue 16): {strategy} @isolated / direct try_lock()",
                _relative(
                    results.decorator,
                    f"{strategy}/@isolated(name)",
                    f"{strategy}/direct try_lock() + release",
                ),
                1.1,
                "x",
            )
            for strategy in ("file", "memory")
        ),
        Target(
            "command: isolated - plain no-op (file)",
            median(wall["noop_isolated"]) - median(wall["noop_plain"]) if wall else None,
            5,
            " ms",
        ),
        Target(
            "command: optional drivers imported (file)",
            None if drivers is None else len(drivers),
            0,
            "",
            "=",
            shown=None if drivers is None else ", ".join(drivers) or "none",
        ),
        *_async(results),
        *_holders(results.holders),
        *_status(results.status),
    ]
