"""Reading logs: every format, exact line numbers across chunks, bad rows as rows."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_ray.config.schema import Prompts
from distill_ray.prompts.read import (
    SourceError,
    check_source,
    parse_unit,
    plan_units,
    source_files,
    unit_rows,
)

GOOD = {"text": "Where is my order ORD-123456?", "category": "shipping", "ref": "ORD-123456"}


def _parse_all(cfg: Prompts, chunk_bytes: int = 32 << 20) -> list[dict]:
    units = plan_units(source_files(cfg), cfg, chunk_bytes=chunk_bytes)
    rows = []
    for unit in unit_rows(units):
        rows.extend(parse_unit(unit, cfg.model_dump(mode="json"), cfg.limit).to_pylist())
    return sorted(rows, key=lambda r: r["order"])


def test_bad_rows_are_rows_with_reasons_and_line_numbers(write_jsonl):
    path = write_jsonl([GOOD, '{"text": "trunc', {"category": "x"}, {"text": "   "}, {"text": 42}, "",
                        {"text": ["a"]}, [1, 2], {"text": "?!?"}, {**GOOD, "text": "Refund please"}])
    rows = _parse_all(Prompts(source=str(path)))
    where = {r["source"].split(":")[1]: r["error"] for r in rows}
    assert where["1"] is None and where["10"] is None
    assert where["2"].startswith("not valid JSON")
    assert where["3"] == "missing field 'text'"
    assert where["4"] == "empty text in 'text'"
    assert where["5"] == "wrong type: 'text' is int, expected a string"
    assert "6" not in where  # a blank line is not a row
    assert where["7"] == "wrong type: 'text' is list, expected a string"
    assert where["8"].startswith("not a JSON object")
    assert where["9"].startswith("empty text")


def test_chunked_jsonl_gives_the_same_rows_and_line_numbers(write_jsonl):
    lines = [{"text": f"message number {i} " + "x" * (i % 37), "category": f"c{i % 3}"} for i in range(400)]
    lines.insert(123, "{broken")
    path = write_jsonl(lines)
    cfg = Prompts(source=str(path))
    whole = _parse_all(cfg)
    chunked = _parse_all(cfg, chunk_bytes=997)  # chunks end mid-line
    assert len(whole) == len(chunked) == 401
    assert [(r["source"], r["id"], r["error"]) for r in whole] == [(r["source"], r["id"], r["error"]) for r in chunked]
    assert next(r for r in chunked if r["error"])["source"].endswith(":124")


def test_messages_field_and_reference(write_jsonl):
    path = write_jsonl([
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Hi ORD-1"},
                      {"role": "assistant", "content": "logged answer"}], "category": "a", "gold": {"x": 1}},
        {"messages": [{"role": "robot", "content": "?"}]},
        {"messages": "not json"},
    ])
    cfg = Prompts(source=str(path), text_field=None, messages_field="messages", reference_field="gold")
    good, robot, text = _parse_all(cfg)
    assert json.loads(good["messages"]) == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Hi ORD-1"}]
    assert good["reference"] == '{"x": 1}'
    assert "messages[0]" in robot["error"] and "JSON" in text["error"]


def test_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "log.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        writer.writerow(["Where is\nmy order?", "shipping"])  # a quoted field over two lines
        writer.writerow(["", "refund"])
        writer.writerow(["Refund ORD-123456", "refund"])
    rows = _parse_all(Prompts(source=str(csv_path)))
    assert [(r["source"], r["error"]) for r in rows] == [
        ("log.csv:2", None), ("log.csv:4", "empty text in 'text'"), ("log.csv:5", None)]

    pq_path = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"text": None, "category": "x", "ref": None}, GOOD]), pq_path, row_group_size=2)
    rows = _parse_all(Prompts(source=str(pq_path), reference_field="ref"))
    assert [(r["source"], r["error"]) for r in rows] == [
        ("log.parquet:row 0", None), ("log.parquet:row 1", "missing field 'text'"), ("log.parquet:row 2", None)]
    assert rows[0]["reference"] == "ORD-123456"


def test_missing_and_empty_sources_are_errors(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        source_files(Prompts(source=str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = Prompts(source=str(empty))
    with pytest.raises(SourceError, match="is empty"):
        check_source(cfg)


def test_limit_reads_only_the_first_lines(write_jsonl):
    path = write_jsonl([{"text": f"m {i}"} for i in range(50)])
    assert len(_parse_all(Prompts(source=str(path), limit=10))) == 10
