"""The history checker: what every critical section did, and whether any two overlapped.

Each worker appends one line per critical section to its journal, ``<worker> <pid> <start>
<end>`` with ``time.monotonic()`` (one clock for every process on a Linux host), and increments a
shared counter file non-atomically inside the section. A correct lock leaves no two overlapping
intervals and a counter equal to the number of sections.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Section:
    worker: str
    pid: int
    start: float
    end: float


def append(journal: Path, worker: str, pid: int, start: float, end: float) -> None:
    with journal.open("a") as f:
        f.write(f"{worker} {pid} {start:.9f} {end:.9f}\n")


def increment(counter: Path) -> None:
    """A read-modify-write that loses updates unless the caller holds the lock."""
    value = int(counter.read_text() or 0)
    counter.write_text(str(value + 1))


def read(journals: list[Path]) -> list[Section]:
    sections = []
    for journal in journals:
        if not journal.exists():
            continue
        for line in journal.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:  # a worker killed mid-write leaves a torn last line
                sections.append(Section(parts[0], int(parts[1]), float(parts[2]), float(parts[3])))
    return sorted(sections, key=lambda s: s.start)


def overlaps(sections: list[Section]) -> list[tuple[Section, Section]]:
    """Every pair of sections where the later one started before the earlier one ended."""
    found = []
    latest: Section | None = None  # the section that ends last among those seen
    for section in sections:
        if latest is not None and section.start < latest.end:
            found.append((latest, section))
        if latest is None or section.end > latest.end:
            latest = section
    return found


def most_inside(sections: list[Section], exclusive: Callable[[Section], bool]) -> tuple[int, int]:
    """Sweeping the sections in time order: the most that were ever inside at once, and how
    many times a section for which ``exclusive`` is true was inside beside another."""
    events = sorted(
        [(s.start, 1, s) for s in sections] + [(s.end, 0, s) for s in sections],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same instant
    )
    inside = most = exclusive_inside = broken = 0
    for _, starts, section in events:
        alone = exclusive(section)
        if starts:
            inside += 1
            exclusive_inside += alone
            most = max(most, inside)
            broken += exclusive_inside > 0 and inside > 1
        else:
            inside -= 1
            exclusive_inside -= alone
    return most, broken


def handoffs(sections: list[Section]) -> list[float]:
    """Gaps between one section's end and the next one's start, in seconds."""
    return [b.start - a.end for a, b in itertools.pairwise(sections) if b.start >= a.end]


@dataclass(frozen=True)
class Verdict:
    sections: int
    overlaps: int
    lost_updates: int
    seconds: float
    handoff_p50: float
    handoff_p99: float

    @property
    def throughput(self) -> float:
        return self.sections / self.seconds if self.seconds else 0.0


def check(journals: list[Path], counter: Path) -> Verdict:
    sections = read(journals)
    gaps = sorted(handoffs(sections)) or [0.0]
    seconds = sections[-1].end - sections[0].start if sections else 0.0
    return Verdict(
        sections=len(sections),
        overlaps=len(overlaps(sections)),
        lost_updates=len(sections) - int(counter.read_text() or 0),
        seconds=seconds,
        handoff_p50=statistics.median(gaps),
        handoff_p99=gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
    )
