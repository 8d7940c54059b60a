"""Print benchmark results as one table (rich), side by side."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def show(title: str, rows: list[tuple[str, str, str]]) -> None:
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal / note")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
