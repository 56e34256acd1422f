"""Reading rows from json / jsonl / parquet / csv files and HF dataset folders.

Every row keeps where it came from (file and 1-based row number) so that any later complaint
can name them. A line that is not valid JSON or not valid UTF-8 becomes a row with an error, not
an exception, so the row report can count it and strict mode can name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# Data sets that `align data prepare NAME` writes from installed PyPI packages; named in errors.
PREPARABLE = {"data/gsm8k": "gsm8k", "data/factual-summary-pairs": "summary-pairs", "data/chitchat": "chitchat"}


class DataError(ValueError):
    """Data that cannot be used; the message names the file, the row and the field."""


@dataclass
class Record:
    source: str
    row: int  # 1-based: the line number for jsonl, the element index + 1 otherwise
    data: dict[str, Any] | None
    error: str | None = None  # why the row could not be read at all

    @property
    def where(self) -> str:
        return f"{self.source}, row {self.row}"


def read_records(path: str | Path) -> Iterator[Record]:
    """Every row of a data file as a Record; an empty file is an error naming it (it would
    otherwise surface later as 'no rows left' with no file to look at)."""
    count = 0
    for record in _read_any(Path(path)):
        count += 1
        yield record
    if count == 0:
        raise DataError(f"{path}: the data file has no rows (is it empty, or the wrong file?)")


def _read_any(path: Path) -> Iterator[Record]:
    if not path.exists():
        hint = ""
        for prefix, name in PREPARABLE.items():
            if path.as_posix().startswith(prefix):
                hint = f" - run `align data prepare {name}` first"
        raise DataError(f"data file not found: {path}{hint}")
    if path.is_dir():
        yield from _read_hf_folder(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix in (".parquet", ".csv"):
        yield from _read_tabular(path, suffix)
    else:
        raise DataError(
            f"{path}: unknown data file type '{suffix}' (use .jsonl, .json, .parquet, .csv or a dataset folder)"
        )


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Record(str(path), number, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(str(path), number, None, f"not valid JSON ({exc.msg}, column {exc.colno})")
                continue
            yield _as_record(path, number, value)


def _read_json(path: Path) -> Iterator[Record]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "for one row per line use .jsonl"
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f'{path}: a .json data file holds a list of rows (or {{"data": [...]}})')
    for index, item in enumerate(value, start=1):
        yield _as_record(path, index, item)


def _read_tabular(path: Path, suffix: str) -> Iterator[Record]:
    if suffix == ".csv":
        # Python's csv keeps every cell a string: a completion "4" must not become the integer 4.
        import csv

        try:
            with path.open(encoding="utf-8", newline="") as handle:
                items = list(csv.DictReader(handle))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: cannot read as CSV ({exc})") from None
    else:
        import pyarrow
        import pyarrow.parquet

        try:
            items = pyarrow.parquet.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read as Parquet ({exc})") from None
    for index, item in enumerate(items, start=1):
        yield _as_record(path, index, item)


def _read_hf_folder(path: Path) -> Iterator[Record]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: a folder must be a dataset saved with `save_to_disk` ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: dataset folder has splits {list(dataset)}; name the split folder instead")
        dataset = dataset["train"]
    for index, item in enumerate(dataset, start=1):
        yield _as_record(path, index, item)


def _as_record(path: Path, row: int, value: Any) -> Record:
    if not isinstance(value, dict):
        return Record(str(path), row, None, f"a row must be a JSON object, got {type(value).__name__}")
    return Record(str(path), row, value)
