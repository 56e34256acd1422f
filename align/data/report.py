"""The row report: every row read is kept, truncated, or dropped for a named reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from align.data.formats import RowError
from align.data.loading import DataError, read_records


@dataclass
class RowProblem:
    source: str
    row: int
    field: str
    message: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}, field '{self.field}': {self.message}"


@dataclass
class RowReport:
    name: str
    read: int = 0
    kept: int = 0  # kept whole
    truncated: int = 0  # kept after truncation
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    problems: list[RowProblem] = field(default_factory=list)  # bad rows (not truncation drops)
    drawn: int | None = None  # a weighted mixture's file: rows drawn from it (repeats count)
    share: float | None = None  # its weight over all the files' weights

    @property
    def used(self) -> int:
        return self.kept + self.truncated

    def keep(self, truncated: bool) -> None:
        if truncated:
            self.truncated += 1
        else:
            self.kept += 1

    def drop(self, problem: RowProblem, bad_row: bool) -> None:
        self.dropped[problem.reason] += 1
        if bad_row:
            self.problems.append(problem)

    def check_balanced(self) -> None:
        assert self.read == self.kept + self.truncated + sum(self.dropped.values()), self

    def raise_if_bad(self, limit: int = 10) -> None:
        """Strict mode: stop before training, naming file, row and field of the bad rows."""
        if not self.problems:
            return
        shown = "\n".join(f"  - {p}" for p in self.problems[:limit])
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        raise DataError(
            f"{self.name}: {len(self.problems)} bad row(s) out of {self.read}:\n{shown}{more}\n"
            "Fix them, or set data.on_bad_rows=skip to drop and count them."
        )

    def summary(self) -> str:
        dropped = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.dropped.items())) or "none"
        drawn = f"; drawn {self.drawn} for a {self.share:.0%} share of the mixture" if self.drawn is not None else ""
        return (
            f"{self.name}: read {self.read} = kept {self.kept} + truncated {self.truncated} "
            f"+ dropped {sum(self.dropped.values())} ({dropped}){drawn}"
        )

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            **({"drawn": self.drawn, "share": self.share} if self.drawn is not None else {}),
        }


def encode_records(
    paths: list[str], name: str, encode_row: Callable[[dict], tuple[Any, bool]], length_reasons=frozenset()
) -> tuple[list, RowReport]:
    """Every row of the files through ``encode_row(row) -> (item, truncated)``, and the row report: a
    row is kept, or dropped and counted (a RowError: its field and reason; a chat template that raised:
    template_error). Drops for a reason in ``length_reasons`` are data.max_length's doing, not bad rows."""
    report = RowReport(name=name)
    items = []
    for path in paths:
        for record in read_records(path):
            report.read += 1
            if record.error:
                report.drop(RowProblem(record.source, record.row, "<row>", record.error, "unreadable"), bad_row=True)
                continue
            try:
                item, truncated = encode_row(record.data)
            except RowError as err:
                problem = RowProblem(record.source, record.row, err.field, str(err), err.reason)
                report.drop(problem, bad_row=err.reason not in length_reasons)
                continue
            except Exception as err:  # the chat template refused this row
                problem = RowProblem(
                    record.source, record.row, "prompt", f"chat template failed: {err}", "template_error"
                )
                report.drop(problem, bad_row=True)
                continue
            items.append(item)
            report.keep(truncated)
    report.check_balanced()
    return items, report
