"""Readers on good and broken files; loss masks for the three shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tether.data.builtin.uri import resolve
from tether.data.formats import IGNORE_INDEX, encode_record, encode_records, validate_records
from tether.data.readers import DataError, Record, read_records


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_jsonl_json_csv_parquet_read_the_same(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    jl = write(tmp_path, "x.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    js = write(tmp_path, "x.json", json.dumps(rows))
    cs = write(tmp_path, "x.csv", "prompt,completion\na,b\nc,d\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    for p in (jl, js, cs, tmp_path / "x.parquet"):
        recs = read_records(p)
        assert [r.data for r in recs] == rows, p
    assert [r.line for r in read_records(jl)] == [1, 2]
    assert [r.line for r in read_records(cs)] == [2, 3]


def test_datasets_object_and_list():
    import datasets

    ds = datasets.Dataset.from_list([{"text": "hello"}, {"text": "world"}])
    assert [r.data["text"] for r in read_records(ds)] == ["hello", "world"]
    assert read_records([{"text": "x"}])[0].line == 1


@pytest.mark.parametrize("content, expect", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', "x.jsonl:2: invalid JSON"),
    ('{"prompt": "a", "completion": "b"}\n[1, 2]\n', "x.jsonl:2: expected an object"),
])
def test_broken_jsonl_names_file_and_line(tmp_path, content, expect):
    p = write(tmp_path, "x.jsonl", content)
    with pytest.raises(DataError) as e:
        read_records(p)
    assert expect in str(e.value)
    assert str(e.value).count("\n") == 0


def test_broken_csv_names_line_and_field(tmp_path):
    p = write(tmp_path, "x.csv", "prompt,completion\na,b\nc\n")
    with pytest.raises(DataError, match=r"x.csv:3: field 'completion': missing cell"):
        read_records(p)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(write(tmp_path, "x.txt", "hi"))


@pytest.mark.parametrize("data, field, problem", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role", "expected one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "expected a string"),
    ({"prompt": "x"}, "completion", "missing"),
    ({"prompt": "x", "completion": " "}, "completion", "empty"),
    ({"text": 5}, "text", "expected a string"),
    ({"foo": 1}, None, "cannot tell the record's shape"),
])
def test_bad_records_name_the_field(tokenizer, data, field, problem):
    with pytest.raises(DataError) as e:
        encode_record(Record(data, "f.jsonl", 7), tokenizer)
    assert e.value.line == 7 and e.value.field == field and problem in str(e.value)
    assert str(e.value).startswith("f.jsonl:7:")


def test_skip_invalid_counts_instead_of_dropping(tokenizer):
    recs = [Record({"text": "ok"}, "f", 1), Record({"text": ""}, "f", 2), Record({"text": "fine"}, "f", 3)]
    with pytest.raises(DataError):
        encode_records(recs, tokenizer)
    ok, skipped = encode_records(recs, tokenizer, skip_invalid=True)
    assert len(ok) == 2 and len(skipped) == 1 and skipped[0].line == 2


def test_mixed_shapes_rejected():
    recs = [Record({"text": "a"}, "f", 1), Record({"prompt": "a", "completion": "b"}, "f", 2)]
    with pytest.raises(DataError, match="mix shapes"):
        validate_records(recs)


def _target_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_chat_mask_covers_only_assistant_turns(tokenizer):
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]
    ex = encode_record(Record({"messages": msgs}, "f", 1), tokenizer)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer.decode(ex.input_ids) == full
    target = _target_text(tokenizer, ex)
    assert "Blue." in target and "Red." in target
    assert "Name a colour" not in target and "Another" not in target and "system" not in target
    assert len(ex.input_ids) == len(ex.labels)
    assert ex.completion == "Red."


def test_prompt_completion_masks_prompt(tokenizer):
    ex = encode_record(Record({"prompt": "2+2=", "completion": " 4"}, "f", 1), tokenizer, chat=False)
    assert _target_text(tokenizer, ex) == " 4" + tokenizer.eos_token
    n_prompt = len(ex.input_ids) - ex.n_target_tokens
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    chat = encode_record(Record({"prompt": "2+2=", "completion": "4"}, "f", 1), tokenizer)  # tokenizer has a template
    assert "<|im_start|>user" in tokenizer.decode(chat.input_ids)
    assert _target_text(tokenizer, chat).startswith("4")


def test_text_trains_on_everything_and_truncation(tokenizer):
    ex = encode_record(Record({"text": "hello world " * 50}, "f", 1), tokenizer, max_length=16)
    assert len(ex.input_ids) == 16 and ex.labels == ex.input_ids
    with pytest.raises(DataError, match="nothing left to learn"):
        encode_record(Record({"prompt": "word " * 40, "completion": "x"}, "f", 3), tokenizer, max_length=8, chat=False)


@pytest.mark.pack
def test_task_and_pack_uris_read_built_in_data():
    """`task://NAME/FILE` and `pack://NAME/FILE` resolve to built-in data wherever a data path is taken
    (recipes, sequences), and a bad one is a one-line DataError naming the URI."""
    rows = read_records(resolve("task://stdlib-module/eval.jsonl"))
    assert len(rows) == 100 and all(r.data["completion"].startswith("import ") for r in rows)
    assert read_records(resolve("pack://general-v2/replay.jsonl"), limit=3)
    with pytest.raises(DataError, match=r"task://nope/train.jsonl: unknown task 'nope'"):
        resolve("task://nope/train.jsonl")
    with pytest.raises(DataError, match=r"no file 'x.jsonl' in task stdlib-module"):
        resolve("task://stdlib-module/x.jsonl")


def test_reading_only_reads_references_are_resolved_first(tmp_path):
    """read_records builds nothing: a `task://`/`pack://` reference is refused, naming the resolver;
    `resolve` hands anything that is not a reference back as a path, unchanged."""
    for ref in ("task://fortune-topics/train.jsonl", "pack://general-v2/replay.jsonl"):
        with pytest.raises(DataError, match=rf"^{ref}: .*resolve it first with tether.data.builtin.uri.resolve"):
            read_records(ref)
    assert resolve("some/file.jsonl") == Path("some/file.jsonl")
    assert resolve(tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    with pytest.raises(DataError, match=r"task://nope/x.jsonl: unknown task 'nope'"):
        resolve("task://nope/x.jsonl")  # refused before anything is built
    with pytest.raises(DataError, match=r"expected task://NAME/FILE or pack://NAME/FILE"):
        resolve("task://fortune-topics")
