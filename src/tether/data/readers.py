"""Read records from JSONL / JSON / CSV / Parquet files or `datasets` objects, keeping their origin.

Every record remembers its file and line so that a bad one is reported as ``file:line: field``
before any model is loaded. Nothing is dropped silently: with ``skip_invalid=True`` the skips are
counted and returned.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .builtin.uri import SCHEMES


class DataError(ValueError):
    """A malformed record: one line naming file, line and field."""

    def __init__(self, source: str, line: int | None, field_name: str | None, problem: str):
        self.source, self.line, self.field, self.problem = source, line, field_name, problem
        where = f"{source}:{line}" if line is not None else source
        what = f" field {field_name!r}:" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")


@dataclass
class Record:
    data: dict[str, Any]
    source: str
    line: int | None  # 1-based line (JSONL, CSV: the row's line) or item index (JSON, Parquet)


@dataclass
class ReadReport:
    records: list[Record] = field(default_factory=list)
    skipped: list[DataError] = field(default_factory=list)


def read_records(src: str | Path | Any, *, limit: int | None = None) -> list[Record]:
    """Records of a file (by suffix) or of a `datasets.Dataset` / list of dicts.

    Only reads: a ``task://`` or ``pack://`` reference is refused here; resolve it to its file first
    with `tether.data.builtin.uri.resolve` (which builds the data on first use)."""
    if isinstance(src, str) and src.startswith(SCHEMES):
        raise DataError(src, None, None, "a data reference, not a file: resolve it first with "
                        "tether.data.builtin.uri.resolve")
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise DataError(str(path), None, None, "file not found")
        if path.is_dir():
            raise DataError(str(path), None, None, "is a directory; give a data file (.jsonl, .json, .csv or .parquet)")
        suffix = path.suffix.lower()
        reader = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
                  ".csv": _read_csv, ".parquet": _read_parquet}.get(suffix)
        if reader is None:
            raise DataError(str(path), None, None,
                            f"unsupported file type {suffix!r} (use .jsonl, .json, .csv or .parquet)")
        records = reader(path)
    elif isinstance(src, list):
        records = [_as_record(r, "<list>", i + 1) for i, r in enumerate(src)]
    elif hasattr(src, "to_list") or hasattr(src, "column_names"):  # datasets.Dataset
        name = getattr(getattr(src, "info", None), "dataset_name", None) or "<dataset>"
        records = [_as_record(r, name, i + 1) for i, r in enumerate(src)]
    else:
        raise TypeError(f"cannot read records from {type(src).__name__}")
    if not records:
        raise DataError(_name(src), None, None, "no records")
    return records[:limit] if limit else records


def _name(src: Any) -> str:
    return str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"


def _as_record(obj: Any, source: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise DataError(source, line, None, f"expected an object, got {type(obj).__name__}")
    return Record(dict(obj), source, line)


def _text(path: Path) -> str:
    """The file as UTF-8 text, or a `DataError` naming the line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(str(path), line, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {col}); "
                        "re-save the file as UTF-8") from None


def _read_jsonl(path: Path) -> list[Record]:
    out = []
    for n, line in enumerate(_text(path).split("\n"), 1):  # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise DataError(str(path), n, None, f"invalid JSON ({why})") from None
        out.append(_as_record(obj, str(path), n))
    return out


def _read_json(path: Path) -> list[Record]:
    try:
        obj = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise DataError(str(path), e.lineno, None, f"invalid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(str(path), None, None, "invalid JSON (nested too deeply)") from None
    if isinstance(obj, dict):
        # {"data": [...]} or {"examples": [...]} or a single list-valued key.
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(str(path), None, None, "expected a list of records or an object holding one list")
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(str(path), None, None, "expected a list of records")
    return [_as_record(r, str(path), i + 1) for i, r in enumerate(obj)]


def _read_csv(path: Path) -> list[Record]:
    out = []
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    try:
        if not reader.fieldnames:
            raise DataError(str(path), 1, None, "no header row")
        for row in reader:
            if None in row:
                raise DataError(str(path), reader.line_num, None, "more cells than header columns")
            if any(v is None for v in row.values()):
                missing = [k for k, v in row.items() if v is None]
                raise DataError(str(path), reader.line_num, missing[0], "missing cell")
            out.append(Record(dict(row), str(path), reader.line_num))
    except csv.Error as e:
        raise DataError(str(path), reader.line_num, None, f"invalid CSV ({e})") from None
    return out


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with datasets
        raise DataError(str(path), None, None, "reading Parquet needs pyarrow: pip install pyarrow") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError, TypeError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(str(path), None, None, f"not a readable Parquet file ({first})") from None
    return [_as_record(r, str(path), i + 1) for i, r in enumerate(rows)]


def iter_valid(records: Iterable[Record], check, *, skip_invalid: bool = False) -> ReadReport:
    """Run ``check(record)`` on each record; raise on the first error unless skipping (counted)."""
    report = ReadReport()
    for r in records:
        try:
            check(r)
        except DataError as e:
            if not skip_invalid:
                raise
            report.skipped.append(e)
            continue
        report.records.append(r)
    return report
