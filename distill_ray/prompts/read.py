"""Reading production logs into prompt rows, in parallel, without ever stopping on a bad row.

The source (JSONL, Parquet or CSV; local or S3) is cut into work units: byte ranges of JSONL
files (aligned to line starts, with exact line numbers from a first newline-counting pass),
row groups of Parquet files, whole CSV files (quoted fields may span lines). Each unit is parsed by
a Ray task into rows with a `source` ("file:line" or "file:row N"), a global `order` (for "keep
the first occurrence"), and either the prompt or an `error` saying what was wrong with the row.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from distill_ray.config.schema import Prompts
from distill_ray.errors import BadInput
from distill_ray.prompts.normalize import normalize, prompt_id, text_hash
from distill_ray.storage import expand_source, filesystem_for

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}
CHUNK_BYTES = 8 << 20  # small enough that a laptop-sized log still spreads over every core
ROW_BITS = 40  # order = file_index << ROW_BITS | row_index: 1 trillion rows per file

ROW_SCHEMA = pa.schema(
    [
        ("order", pa.int64()),
        ("source", pa.string()),
        ("error", pa.string()),
        ("id", pa.string()),
        ("raw_hash", pa.int64()),
        ("normalized", pa.string()),
        ("messages", pa.string()),  # JSON list of {role, content}: the artifact turns it into list<struct>
        ("category", pa.string()),
        ("reference", pa.string()),
    ]
)


@dataclass(frozen=True)
class Unit:
    """One piece of the source parsed by one task."""

    uri: str
    file_index: int
    format: str
    start: int = 0  # JSONL: byte offset; Parquet: row group index
    end: int = -1  # JSONL: byte offset (exclusive)
    first_line: int = 1  # JSONL: 1-based line number of the first line starting at/after `start`
    first_row: int = 0  # Parquet: row index of the row group's first row


class SourceError(BadInput, ValueError):
    """The source as a whole is unusable (missing, empty, unknown format)."""


def source_format(uri: str, configured: str) -> str:
    if configured != "auto":
        return configured
    for ext, fmt in EXTENSIONS.items():
        if uri.lower().endswith(ext):
            return fmt
    raise SourceError(f"prompts.format: cannot tell the format of {uri} from its extension; set it (jsonl|parquet|csv)")


def source_files(cfg: Prompts) -> list[str]:
    """Every source file, sorted, for a file, folder, glob or list of them.

    Raises:
        SourceError: when a source matches no file.
    """
    uris = [cfg.source] if isinstance(cfg.source, str) else list(cfg.source)
    files: list[str] = []
    for uri in uris:
        try:
            files.extend(expand_source(uri, tuple(EXTENSIONS)))
        except FileNotFoundError:
            raise SourceError(f"prompts.source: no such file or folder (or nothing matches): {uri}") from None
        except OSError as exc:
            raise SourceError(f"prompts.source: cannot read {uri}: {exc}") from exc
    return files


def check_source(cfg: Prompts) -> list[str]:
    """The source files, after the cheap checks (they exist, their format is known, not all empty).

    Raises:
        SourceError: naming the key and the file(s).
    """
    files = source_files(cfg)
    total_bytes = 0
    for uri in files:
        source_format(uri, cfg.format)
        fs, path = filesystem_for(uri)
        total_bytes += fs.get_file_info(path).size or 0
    if total_bytes == 0:
        raise SourceError(f"prompts.source: the source is empty: {', '.join(files)} hold(s) no rows")
    return files


def plan_units(files: list[str], cfg: Prompts, chunk_bytes: int = CHUNK_BYTES) -> list[Unit]:
    """Cut the (checked) source into units; JSONL line numbers come from counting newlines per chunk."""
    units: list[Unit] = []
    for index, uri in enumerate(files):
        fmt = source_format(uri, cfg.format)
        fs, path = filesystem_for(uri)
        size = fs.get_file_info(path).size or 0
        if size == 0:
            continue
        if fmt == "jsonl":
            starts = list(range(0, size, chunk_bytes))
            line = 1
            for start in starts:
                end = min(start + chunk_bytes, size)
                units.append(Unit(uri, index, fmt, start, end, first_line=line))
                if end < size:
                    line += _count_newlines(uri, start, end)
        elif fmt == "parquet":
            with fs.open_input_file(path) as handle:
                meta = pq.ParquetFile(handle).metadata
            row = 0
            for group in range(meta.num_row_groups):
                units.append(Unit(uri, index, fmt, start=group, first_row=row))
                row += meta.row_group(group).num_rows
        else:
            units.append(Unit(uri, index, fmt))
    return units


def _count_newlines(uri: str, start: int, end: int) -> int:
    fs, path = filesystem_for(uri)
    with fs.open_input_file(path) as handle:
        handle.seek(start)
        return handle.read(end - start).count(b"\n")


def _adjusted_first_line(uri: str, unit: Unit) -> tuple[int, int]:
    """Where the first whole line of a JSONL chunk starts, and its line number."""
    if unit.start == 0:
        return 0, unit.first_line
    fs, path = filesystem_for(uri)
    with fs.open_input_file(path) as handle:
        handle.seek(unit.start - 1)
        if handle.read(1) == b"\n":
            return unit.start, unit.first_line
        rest = handle.read(unit.end - unit.start)
    cut = rest.find(b"\n")
    if cut < 0:
        return unit.end, unit.first_line  # the chunk lies inside one long line owned by an earlier chunk
    return unit.start + cut + 1, unit.first_line + 1


class RowParser:
    """Turns one raw record into a prompt row or an error row."""

    def __init__(self, cfg: Prompts):
        self.cfg = cfg

    def parse(self, record: Any, order: int, source: str) -> dict[str, Any]:
        row: dict[str, Any] = {"order": order, "source": source, "error": None}
        cfg = self.cfg
        if not isinstance(record, dict):
            return {**row, "error": f"not a JSON object (a {type(record).__name__})"}
        if cfg.messages_field:
            messages, error = self._messages(record)
        else:
            messages, error = self._text(record)
        if error:
            return {**row, "error": error}
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) if cfg.messages_field else messages[0]["content"]
        normalized = normalize(text)
        if not normalized:
            return {**row, "error": "empty text (nothing left after removing punctuation and spaces)"}
        category = record.get(cfg.category_field) if cfg.category_field else None
        reference = record.get(cfg.reference_field) if cfg.reference_field else None
        if reference is not None and not isinstance(reference, str):
            reference = json.dumps(reference, ensure_ascii=False)
        return {
            **row,
            "id": prompt_id(normalized),
            "raw_hash": text_hash(text),
            "normalized": normalized,
            "messages": json.dumps(messages, ensure_ascii=False),
            "category": "unknown" if category in (None, "") else str(category),
            "reference": reference,
        }

    def _text(self, record: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
        field = self.cfg.text_field
        if field not in record or record[field] is None:
            return [], f"missing field '{field}'"
        value = record[field]
        if not isinstance(value, str):
            return [], f"wrong type: '{field}' is {type(value).__name__}, expected a string"
        if not value.strip():
            return [], f"empty text in '{field}'"
        return [{"role": "user", "content": value.strip()}], None

    def _messages(self, record: dict[str, Any]) -> tuple[list[dict[str, str]], str | None]:
        field = self.cfg.messages_field
        if field not in record or record[field] is None:
            return [], f"missing field '{field}'"
        value = record[field]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return [], f"wrong type: '{field}' is a string that is not a JSON messages list"
        if not isinstance(value, list) or not value:
            return [], f"wrong type: '{field}' must be a non-empty list of {{role, content}}"
        messages = []
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in (
                "system", "user", "assistant", "developer",
            ):
                return [], f"'{field}[{i}]' is not a {{role: system|user|assistant, content: string}} message"
            messages.append({"role": message["role"], "content": message["content"]})
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()  # a logged answer: the teacher gives its own
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            return [], f"empty text: '{field}' has no non-empty user message"
        return messages, None


def parse_unit(unit_row: dict[str, Any], cfg_json: dict[str, Any], limit: int | None) -> pa.Table:
    """Parse one unit into a table of ROW_SCHEMA (a Ray Data map_batches function)."""
    cfg = Prompts.model_validate(cfg_json)
    unit = Unit(**unit_row)
    parser = RowParser(cfg)
    name = posixpath.basename(unit.uri)
    base = unit.file_index << ROW_BITS
    rows: list[dict[str, Any]] = []
    fs, path = filesystem_for(unit.uri)
    if unit.format == "jsonl":
        offset, line_no = _adjusted_first_line(unit.uri, unit)
        with fs.open_input_file(path) as handle:
            handle.seek(offset)
            data = handle.read(max(0, unit.end - offset))
            size = fs.get_file_info(path).size or 0
            # The chunk's last line may run past `end`: read on to its newline.
            while data and not data.endswith(b"\n") and offset + len(data) < size:
                piece = handle.read(64 << 10)
                cut = piece.find(b"\n")
                data += piece if cut < 0 else piece[: cut + 1]
        for raw in data.split(b"\n"):
            if limit is not None and line_no > limit:
                break
            if raw.strip():
                source = f"{name}:{line_no}"
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    rows.append({"order": base | line_no, "source": source, "error": f"not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"})
                else:
                    rows.append(parser.parse(record, base | line_no, source))
            line_no += 1
    elif unit.format == "parquet":
        with fs.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read_row_group(unit.start)
        for i, record in enumerate(table.to_pylist()):
            row_no = unit.first_row + i
            if limit is not None and row_no >= limit:
                break
            rows.append(parser.parse(record, base | row_no, f"{name}:row {row_no}"))
    else:
        with fs.open_input_stream(path) as stream:
            text = io.TextIOWrapper(io.BytesIO(stream.read()), encoding="utf-8", errors="replace", newline="")
        reader = csv.DictReader(text)
        _ = reader.fieldnames  # reads the header, so line_num counts from it
        while True:
            line_no = reader.line_num + 1
            if limit is not None and line_no > limit + 1:
                break
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                rows.append({"order": base | line_no, "source": f"{name}:{line_no}", "error": f"not valid CSV: {exc}"})
                continue
            if None in record:
                rows.append({"order": base | line_no, "source": f"{name}:{line_no}", "error": "more fields than the header"})
                continue
            rows.append(parser.parse(record, base | line_no, f"{name}:{line_no}"))
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def unit_rows(units: list[Unit]) -> list[dict[str, Any]]:
    return [asdict(u) for u in units]
