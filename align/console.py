"""The one rich console every command prints through, and the plan table each command starts with."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def print_plan(title: str, rows: dict[str, str]) -> None:
    table = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
