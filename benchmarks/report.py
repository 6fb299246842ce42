"""Statistics and the plain-text tables every section prints."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Row:
    label: str
    cells: list[str]
    #: This row's figure divided by the raw limit's (the group's first row), if measured.
    ratio: float | None = None


@dataclass
class Group:
    """Rows that share a raw limit; the title says which it is."""

    title: str
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def ratio(value: float, base: float | None) -> float | None:
    return None if base is None or base == 0 else value / base


def print_table(
    title: str, headers: list[str], groups: list[Group], *, ratios: bool = True
) -> None:
    """A title, then each group's title, rows and skip notes, the ratio in the last column
    (none for a table of counts, ``ratios`` False)."""
    width = max([36, *(len(row.label) + 4 for group in groups for row in group.rows)])
    print(f"\n{title}")
    headers = [*headers, "x raw"] if ratios else headers
    print(" " * width + "".join(f"{header:>11}" for header in headers))
    for group in groups:
        print(f"  {group.title}")
        for row in group.rows:
            cells = row.cells
            if ratios:
                cells = [*cells, "" if row.ratio is None else f"{row.ratio:.2f}x"]
            print(f"    {row.label:{width - 4}}" + "".join(f"{cell:>11}" for cell in cells))
        for note in group.skipped:
            print(f"    skipped: {note}")


@dataclass
class Target:
    """One of the issue's targets: ``measured`` against ``limit`` (``relation`` <=, >= or =)."""

    what: str
    measured: float | None
    limit: float
    unit: str
    relation: str = "<="
    #: How to show ``measured`` when a number says less (e.g. which modules were imported).
    shown: str | None = None
    #: What puts the figure in context, printed after the status (e.g. the raw limit's own).
    context: str = ""
    #: The strategy refuses what the target measures (it lacks the ability).
    refused: bool = False

    @property
    def status(self) -> str:
        if self.refused:
            return "refused"
        if self.measured is None:
            return "not run"
        met = {
            "<=": self.measured <= self.limit,
            ">=": self.measured >= self.limit,
            "=": self.measured == self.limit,
        }[self.relation]
        return "met" if met else "missed"


def print_targets(targets: list[Target], note: str = "") -> None:
    print(f"\nTargets (issue 15){note}")
    width = max(len(target.what) for target in targets) + 4
    for target in targets:
        measured = "-" if target.measured is None else f"{target.measured:.2f}{target.unit}"
        measured = target.shown or measured
        limit = f"{target.relation} {target.limit:g}{target.unit}"
        line = f"    {target.what:{width - 4}}{measured:>11}{limit:>12}   {target.status:8}"
        print(f"{line} {target.context}".rstrip())
