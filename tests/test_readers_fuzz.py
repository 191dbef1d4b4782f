"""Readers under arbitrary input: bytes, JSON values, CSV cells and Parquet tables of any shape.

Whatever a user's file holds, reading and checking it raises the tool's own `DataError` (one line
naming the file and, where there is one, the line) and nothing else.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.data.formats import validate_records
from tether.data.readers import DataError, read_records

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "completion", "text", "messages", "role", "content", "x"]) | st.text(max_size=5),
        inner, max_size=4),
    max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", 3]),
                                           "content": st.text(max_size=10) | st.integers() | st.none()}),
                    max_size=4)
records = st.dictionaries(st.sampled_from(["prompt", "completion", "text", "messages", "extra"]),
                          json_values | messages | st.text(max_size=15), max_size=3)


def read_and_check(path):
    """What `tether train` does to a task file before any model loads."""
    try:
        validate_records(read_records(path))
    except DataError as e:
        line = str(e)
        assert "\n" not in line.strip() and str(path) in line, line


@SETTINGS
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_any_bytes_in_any_format(tmp_path, data, suffix):
    path = tmp_path / f"task{suffix}"
    path.write_bytes(data)
    read_and_check(path)


@SETTINGS
@given(rows=st.lists(records | json_values, max_size=5), as_list=st.booleans())
def test_any_json_values_as_jsonl_and_json(tmp_path, rows, as_list):
    jsonl = tmp_path / "task.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    read_and_check(jsonl)
    whole = tmp_path / "task.json"
    whole.write_text(json.dumps(rows if as_list else {"data": rows}), encoding="utf-8")
    read_and_check(whole)


@SETTINGS
@given(header=st.lists(st.sampled_from(["prompt", "completion", "text", "messages", "x", ""]), max_size=4),
       cells=st.lists(st.lists(st.text(max_size=8), max_size=5), max_size=4))
def test_any_csv_table(tmp_path, header, cells):
    import csv

    path = tmp_path / "task.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(cells)
    read_and_check(path)


@SETTINGS
@given(rows=st.lists(st.fixed_dictionaries({}, optional={
    "prompt": st.text(max_size=10) | st.none(), "completion": st.text(max_size=10) | st.integers(),
    "text": st.text(max_size=10), "messages": messages}), min_size=1, max_size=4))
def test_any_parquet_table(tmp_path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return  # a table Arrow itself cannot hold never reaches a file
    path = tmp_path / "task.parquet"
    pq.write_table(table, path)
    read_and_check(path)


def test_latin1_file_names_file_and_line(tmp_path):
    path = tmp_path / "tickets.jsonl"
    path.write_bytes(b'{"prompt": "ok", "completion": "a"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=r"tickets\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_records(path)
