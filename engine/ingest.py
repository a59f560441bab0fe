"""Bulk imports: items, users, events and embeddings from CSV / JSONL (or records), all-or-nothing.

Events files on PostgreSQL >= 16 take the fast path: the file's text is COPYed as it is into a staging table
and one set-based statement casts and checks every row (``pg_input_is_valid``); only the rows it refuses
come back to Python, which names the line, the field and the reason with the same parsers the slow path
uses. Records, items, users, PostgreSQL 15 and files COPY cannot read (ragged rows, bad encoding) take the
slow path: every row is parsed here and COPYed typed. Both fill the same staging table, which is merged by
set-based statements from ``sql/queries/ingest.sql``. A file with a bad row imports nothing unless
``skip_invalid`` is set, in which case the bad rows go to a rejects file with reasons.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from engine.sql import query

Record = tuple[int, dict[str, Any]]  # (line number, raw fields)
Progress = Callable[[int], None]


class FieldError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Reject:
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}, field {self.field}: {self.reason}"


class ImportFailed(ValueError):
    """A file had bad rows and nothing was imported. ``rejects`` lists them (the first few in the message)."""

    def __init__(self, source: str, rejects: list[Reject]) -> None:
        self.source = source
        self.rejects = rejects
        more = f" (and {len(rejects) - 3} more)" if len(rejects) > 3 else ""
        shown = "; ".join(str(r) for r in rejects[:3])
        super().__init__(f"{source}: nothing imported: {shown}{more}")


@dataclass
class ImportResult:
    kind: str
    read: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: list[Reject] = field(default_factory=list)
    seconds: float = 0.0
    checked_by: str = "python"  # "sql": the file was cast and checked by one SQL pass (events, PostgreSQL >= 16)

    @property
    def rows_per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- field parsers (one rule each)


# ASCII whitespace around a value is ignored: the one set both import paths trim (SQL btrim in events_from_raw)
_WS = " \t\n\r\x0b\x0c"


def _text(raw: dict[str, Any], name: str, *, required: bool) -> str | None:
    v = raw.get(name)
    s = None if v is None else str(v).strip(_WS)
    if not s:
        if required:
            raise FieldError(name, "is required")
        return None
    if len(s) > 256:
        raise FieldError(name, "is longer than 256 characters")
    return s


# The time grammar of both import paths (SQL: events_from_raw): YYYY-MM-DD, optionally a time, fraction and
# offset (ISO 8601 as datetime.fromisoformat and PostgreSQL both read it), or unix seconds.
_ISO_CHARS = frozenset("0123456789T:.Z+- ")
_UNIX_CHARS = frozenset("0123456789.-")
_UNIX_RANGE = (-62135596800.0, 253402300799.0)  # years 1 to 9999


def parse_time(v: Any, name: str, *, required: bool) -> datetime | None:
    """ISO 8601 date or date-time (naive times are UTC) or unix seconds."""
    s = None if v is None else str(v).strip(_WS)
    if not s:
        if required:
            raise FieldError(name, "is required")
        return None
    try:
        if isinstance(v, int | float) and not isinstance(v, bool):
            seconds: float | None = float(v)
        elif len(s) >= 10 and s[4] == "-" and s[7] == "-":
            # a date, then nothing or a time from HH:MM on (hours 00-23), digits and ISO punctuation only
            if not _ISO_CHARS.issuperset(s) or (len(s) > 10 and not (s[10] in "T " and s[13:14] == ":"
                                                                     and "00" <= s[11:13] <= "23")):
                raise ValueError(s)
            seconds = None
        elif _UNIX_CHARS.issuperset(s):
            seconds = float(s)
        else:
            raise ValueError(s)
        if seconds is None:
            t = datetime.fromisoformat(s.replace("Z", "+00:00"))
        elif _UNIX_RANGE[0] <= seconds <= _UNIX_RANGE[1]:
            t = datetime.fromtimestamp(seconds, tz=UTC)
        else:
            raise ValueError(s)
    except (ValueError, OverflowError, OSError):
        raise FieldError(name, f"not an ISO 8601 time or unix seconds ({str(v)[:40]!r})") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip(_WS))


def _json_object(v: Any, name: str) -> str | None:
    if _missing(v):
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as exc:
            raise FieldError(name, f"not valid JSON ({exc.msg})") from None
    if not isinstance(v, dict):
        raise FieldError(name, "must be a JSON object")
    return json.dumps(v, allow_nan=False, default=str)


def _categories(v: Any) -> list[str] | None:
    if v is None or v == "":
        return None
    if isinstance(v, str):
        parts = [p.strip() for p in v.split("|")]
    elif isinstance(v, list):
        parts = [str(p).strip() for p in v if p is not None]
    else:
        raise FieldError("categories", "must be '|'-separated text or a list")
    return [p for p in parts if p]


def _number(v: Any, name: str) -> float | None:
    if _missing(v):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise FieldError(name, f"not a number ({str(v)[:40]!r})") from None
    if not math.isfinite(x):
        raise FieldError(name, "must be a finite number")
    return x


def _bool(v: Any, name: str) -> bool | None:
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "t", "1", "yes"):
        return True
    if s in ("false", "f", "0", "no"):
        return False
    raise FieldError(name, f"not a boolean ({s[:20]!r})")


def _uuid(v: Any, name: str) -> str | None:
    if _missing(v):
        return None
    import uuid

    try:
        return str(uuid.UUID(str(v)))
    except ValueError:
        raise FieldError(name, "not a UUID") from None


def parse_item(raw: dict[str, Any]) -> tuple[Any, ...]:
    return (
        _text(raw, "item_id", required=True),
        _categories(raw.get("categories")),
        parse_time(raw.get("created_at"), "created_at", required=False),
        _json_object(raw.get("properties"), "properties"),
        _bool(raw.get("available"), "available"),
    )


def parse_user(raw: dict[str, Any]) -> tuple[Any, ...]:
    return (_text(raw, "user_id", required=True), _json_object(raw.get("properties"), "properties"))


_FUTURE_SLACK_S = 86400.0


def parse_event(raw: dict[str, Any]) -> tuple[Any, ...]:
    t = parse_time(raw.get("occurred_at"), "occurred_at", required=True)
    assert t is not None
    if t.timestamp() > time.time() + _FUTURE_SLACK_S:
        raise FieldError("occurred_at", f"{t.isoformat()} is in the future")
    return (
        _text(raw, "event_id", required=False),
        _text(raw, "user_id", required=True),
        _text(raw, "item_id", required=True),
        _text(raw, "event_type", required=True),
        t,
        _number(raw.get("value"), "value"),
        _json_object(raw.get("properties"), "properties"),
        _uuid(raw.get("request_id"), "request_id"),
    )


@dataclass(frozen=True)
class _Kind:
    stage: str
    table: str
    columns: tuple[str, ...]
    parse: Callable[[dict[str, Any]], tuple[Any, ...]]
    merge: str


KINDS: dict[str, _Kind] = {
    "items": _Kind("create_items_stage", "stage_items",
                   ("item_id", "categories", "created_at", "properties", "available"), parse_item, "merge_items"),
    "users": _Kind("create_users_stage", "stage_users", ("user_id", "properties"), parse_user, "merge_users"),
    "events": _Kind("create_events_stage", "stage_events",
                    ("event_id", "user_id", "item_id", "event_type", "occurred_at", "value", "properties",
                     "request_id"), parse_event, "merge_events"),
}


# COPY text format: backslash, tab, newline and carriage return are escaped; NULL is \N.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_ARRAY_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})


def _copy_text(v: Any) -> str:
    """One already-validated value as a field of COPY's text format (much faster than row adaptation)."""
    if v is None:
        return "\\N"
    if isinstance(v, str):
        return v.translate(_COPY_ESCAPES)
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return ("{" + ",".join('"' + str(x).translate(_ARRAY_ESCAPES) + '"' for x in v) + "}").translate(_COPY_ESCAPES)
    raise TypeError(f"cannot COPY a {type(v).__name__}")


# ---------------------------------------------------------------- reading files


def read_records(path: Path, progress: Progress | None = None) -> Iterator[Record]:
    """(line, fields) from a CSV file with a header row or a JSONL file; line numbers count from 1.

    ``progress`` is called with 1 per record read.
    """
    suffix = path.suffix.lower()
    with path.open("r", encoding="utf-8", newline="") as fh:
        if suffix in (".jsonl", ".ndjson", ".json"):
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                if progress:
                    progress(1)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, {"__error__": FieldError("(line)", f"not valid JSON ({exc.msg})")}
                    continue
                if not isinstance(obj, dict):
                    yield n, {"__error__": FieldError("(line)", "must be a JSON object")}
                    continue
                yield n, obj
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                if progress:
                    progress(1)
                if None in row:
                    yield reader.line_num, {"__error__": FieldError("(line)", "has more fields than the header")}
                    continue
                yield reader.line_num, row
        else:
            raise ValueError(f"{path}: unknown file type {suffix!r} (expected .csv, .tsv or .jsonl)")


def count_records(path: Path) -> int:
    """Lines in a file, minus the CSV header: the total for a progress bar."""
    n = 0
    last = b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    n += last != b"\n"  # a last line without its newline
    return max(0, n - 1) if path.suffix.lower() in (".csv", ".tsv") else n


# ---------------------------------------------------------------- loading


def import_records(
    conn: psycopg.Connection[Any],
    kind: str,
    records: Iterable[Record],
    *,
    source: str = "records",
    skip_invalid: bool = False,
    create_missing_items: bool = False,
) -> ImportResult:
    """Parse, stage and merge in one transaction. Raises ImportFailed (nothing stored) on a bad row."""
    spec = KINDS[kind]
    result = ImportResult(kind)
    t0 = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query("ingest.import_settings"))
        cur.execute(query(f"ingest.{spec.stage}"))
        _stage_parsed(cur, spec, records, result)
        if result.rejected and not skip_invalid:
            raise ImportFailed(source, result.rejected)
        if kind == "events":
            _merge_events(conn, cur, result, skip_invalid, create_missing_items, source)
        else:
            cur.execute(query(f"ingest.{spec.merge}"))
            result.stored = cur.rowcount
            result.duplicates = result.read - len(result.rejected) - result.stored
    result.seconds = time.perf_counter() - t0
    return result


def _stage_parsed(cur: psycopg.Cursor[Any], spec: _Kind, records: Iterable[Record], result: ImportResult) -> None:
    """The slow path: parse every record here, COPY the good ones typed, collect the bad ones."""
    cols = sql.SQL(", ").join(map(sql.Identifier, ("line", *spec.columns)))
    with cur.copy(sql.SQL(query("ingest.copy_stage")).format(table=sql.Identifier(spec.table), columns=cols)) as copy:
        buf: list[str] = []
        for line, raw in records:
            result.read += 1
            try:
                if "__error__" in raw:
                    raise raw["__error__"]
                row = spec.parse(raw)
            except FieldError as exc:
                result.rejected.append(Reject(line, exc.field, exc.reason))
                continue
            buf.append(f"{line}\t" + "\t".join(map(_copy_text, row)) + "\n")
            if len(buf) >= 5000:
                copy.write("".join(buf))
                buf.clear()
        if buf:
            copy.write("".join(buf))


def _merge_events(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], result: ImportResult,
                  skip_invalid: bool, create_missing_items: bool, source: str) -> None:
    """From staged, checked rows: reference checks, missing users (and items), partitions, then the merge."""
    _check_event_references(cur, result, skip_invalid, create_missing_items, source)
    cur.execute(query("ingest.create_missing_users"))
    cur.execute(query("ingest.ensure_partitions"))
    try:  # new events (the usual bulk load): plain INSERTs, no per-row conflict handling
        with conn.transaction():
            cur.execute(query("ingest.resolve_new_events"))
            cur.execute(query("ingest.insert_new_event_ids"))
            cur.execute(query("ingest.insert_new_events"))
            stored = cur.rowcount
    except psycopg.errors.UniqueViolation:  # some are known (or an id repeats): rolled back, merge row by row
        cur.execute(query("ingest.merge_events"))
        _seen, stored = cur.fetchone() or (0, 0)
    result.stored = int(stored)
    result.duplicates = result.read - len(result.rejected) - result.stored


def _check_event_references(
    cur: psycopg.Cursor[Any], result: ImportResult, skip_invalid: bool, create_missing_items: bool, source: str
) -> None:
    bad: list[Reject] = []
    cur.execute(query("ingest.unknown_references"), {"create_missing_items": create_missing_items})
    for line, unknown_type, event_type, unknown_item, item_id in cur.fetchall():
        if unknown_type:
            bad.append(Reject(line, "event_type", f"unknown event type {event_type!r}"))
        if unknown_item:
            bad.append(Reject(
                line, "item_id", f"unknown item {item_id!r} (import items first or pass --create-missing-items)"))
    if bad:
        if not skip_invalid:
            raise ImportFailed(source, bad)
        cur.execute(query("ingest.drop_lines"), {"lines": sorted({r.line for r in bad})})
        result.rejected.extend(bad)
    if create_missing_items:
        cur.execute(query("ingest.create_missing_items"))


def import_file(
    conn: psycopg.Connection[Any],
    kind: str,
    path: Path,
    *,
    skip_invalid: bool = False,
    rejects_path: Path | None = None,
    create_missing_items: bool = False,
    progress: Progress | None = None,
) -> ImportResult:
    """Import one CSV/JSONL file of items, users or events (formats in the README)."""
    if kind not in KINDS:
        raise ValueError(f"unknown import kind {kind!r}; expected one of {sorted(KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if kind == "events" and _fast_path_applies(conn, path):
        result = _import_events_file(conn, path, skip_invalid=skip_invalid,
                                     create_missing_items=create_missing_items, progress=progress)
    else:
        result = import_records(
            conn, kind, read_records(path, progress), source=str(path), skip_invalid=skip_invalid,
            create_missing_items=create_missing_items,
        )
    if result.rejected:
        write_rejects(rejects_path or path.with_suffix(path.suffix + ".rejects.jsonl"), result.rejected)
    return result


# ---------------------------------------------------------------- the fast path for events files

_FAST_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None, ".json": None}
_EVENT_FIELDS = KINDS["events"].columns
_EXTRA_COLUMNS = tuple(f"extra_{n}" for n in range(1, 9))  # spare columns of stage_events_raw
_CHUNK = 1 << 20


class _NotCopyable(Exception):
    """The file needs the Python reader (the fast path rolled back its staging)."""


def _fast_path_applies(conn: psycopg.Connection[Any], path: Path) -> bool:
    # pg_input_is_valid, which checks every field in one pass, came with PostgreSQL 16
    return path.suffix.lower() in _FAST_SUFFIXES and conn.info.server_version >= 160000


def _import_events_file(conn: psycopg.Connection[Any], path: Path, *, skip_invalid: bool,
                        create_missing_items: bool, progress: Progress | None) -> ImportResult:
    source = str(path)
    result = ImportResult("events")
    t0 = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query("ingest.import_settings"))
        try:
            with conn.transaction():  # a savepoint: a file COPY cannot read leaves nothing behind
                _stage_raw_events(cur, path, result, progress)
        except (_NotCopyable, psycopg.errors.DataError):
            result = ImportResult("events")
            cur.execute(query("ingest.create_events_stage"))
            _stage_parsed(cur, KINDS["events"], read_records(path), result)
        if result.rejected and not skip_invalid:
            raise ImportFailed(source, result.rejected)
        _merge_events(conn, cur, result, skip_invalid, create_missing_items, source)
    result.seconds = time.perf_counter() - t0
    return result


def _stage_raw_events(cur: psycopg.Cursor[Any], path: Path, result: ImportResult,
                      progress: Progress | None) -> None:
    """COPY the file's text into stage_events_raw, then cast and check it into stage_events in one statement."""
    cur.execute(query("ingest.create_events_stage"))
    cur.execute(query("ingest.create_events_raw"))
    delimiter = _FAST_SUFFIXES[path.suffix.lower()]
    with path.open("rb") as fh:
        if delimiter is None:  # JSONL: each line is one text value, then split into fields by SQL
            cur.execute(query("ingest.create_lines_stage"))
            _copy_chunks(cur, fh, sql.SQL(query("ingest.copy_lines")), progress)
            padded = True  # JSON puts spaces everywhere; the values themselves are checked by SQL
            cur.execute(query("ingest.events_raw_from_lines"))
            result.read = cur.rowcount
            cur.execute(query("ingest.bad_json_lines"))
            bad_lines = cur.fetchall()
            result.read += len(bad_lines)
            result.rejected.extend(_json_line_reject(line, doc) for line, doc in bad_lines)
            line_offset = 0
        else:
            columns = _raw_columns(fh.readline(), delimiter)
            copy = sql.SQL(query("ingest.copy_events_raw")).format(
                columns=sql.SQL(", ").join(map(sql.Identifier, columns)), delimiter=sql.Literal(delimiter))
            newlines, ends_with_newline, padded = _copy_chunks(cur, fh, copy, progress, delimiter.encode())
            result.read = cur.rowcount
            line_offset = 1  # the header
            # line = record number + 1 only when no record spans lines (a quoted newline): else the Python reader
            if not (newlines == result.read or (newlines == result.read - 1 and not ends_with_newline)):
                raise _NotCopyable
    cur.execute(query("ingest.events_from_raw"), {"line_offset": line_offset, "trim": padded})
    result.checked_by = "sql"
    cur.execute(query("ingest.count_bad_event_rows"))
    if (cur.fetchone() or (0,))[0]:
        cur.execute(query("ingest.bad_event_rows"), {"line_offset": line_offset})
        bad = [_field_reject(line, field, raw) for line, field, raw in cur.fetchall()]
        result.rejected.extend(bad)
        result.rejected.sort(key=lambda r: r.line)
        cur.execute(query("ingest.drop_bad_event_rows"))


def _raw_columns(header_line: bytes, delimiter: str) -> list[str]:
    """The stage_events_raw column of each header field (as csv.DictReader maps them: the last of a name wins)."""
    try:
        text = header_line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise _NotCopyable from None
    if not text or text.count('"') % 2:
        raise _NotCopyable
    header = next(csv.reader([text], delimiter=delimiter))
    last = {name: i for i, name in enumerate(header)}
    extras = iter(_EXTRA_COLUMNS)
    try:
        return [name if name in _EVENT_FIELDS and last[name] == i else next(extras) for i, name in enumerate(header)]
    except StopIteration:
        raise _NotCopyable from None


def _copy_chunks(cur: psycopg.Cursor[Any], fh: Any, statement: sql.Composed | sql.SQL, progress: Progress | None,
                 delimiter: bytes = b"") -> tuple[int, bool, bool]:
    """Stream the rest of a file into COPY.

    Returns (newlines seen, whether the data ends with one, whether some value may start or end with whitespace).
    """
    newlines = 0
    last = b"\n"  # as if after a line end: whitespace at the start of the data is found like any other
    padded = False
    padding_in = _padding_finder(delimiter)
    with cur.copy(statement) as copy:
        while chunk := fh.read(_CHUNK):
            seam = last + chunk
            # COPY reads a line holding only \. as the end of the data: let the Python reader handle such a file
            if b"\\." in seam:
                raise _NotCopyable
            padded = padded or padding_in(seam)
            n = chunk.count(b"\n")
            newlines += n
            last = chunk[-1:]
            copy.write(chunk)
            if progress:
                progress(n)
    padded = padded or (last != b"\n" and last in _WS_BYTES)
    return newlines, last == b"\n", padded


_WS_BYTES = tuple(c.encode() for c in _WS)


def _padding_patterns(delimiter: bytes) -> tuple[bytes, ...]:
    """Byte pairs that any value starting or ending with whitespace puts in a CSV file (and some that are harmless).

    A value's first character follows a delimiter, a line end or an opening quote; its last one precedes a
    delimiter, a line end or a closing quote. Outside quotes COPY reads a carriage return only as (part of) a
    line end, and a newline inside quotes makes the record span lines (the Python reader takes those files), so line-end
    characters count only next to a quote. Vertical tab and form feed count wherever they are.
    """
    if not delimiter:
        return ()
    pairs = {b"\x0b", b"\x0c", b'"\r', b'\r"', b'"\n', b'\n"'}
    for w in (b" ", b"\t"):
        for edge in (delimiter, b'"', b"\n", b"\r"):
            pairs.add(edge + w)
            pairs.add(w + edge)
    pairs.discard(delimiter + delimiter)  # an empty field (TSV: two tabs)
    return tuple(sorted(pairs))


def _padding_finder(delimiter: bytes) -> Callable[[bytes], bool]:
    """Whether a chunk holds one of ``_padding_patterns``: a few byte scans, and one regex search only when the
    chunk has spaces, quotes or (CSV) tabs at all."""
    patterns = _padding_patterns(delimiter)
    if not patterns:
        return lambda data: False
    regex = re.compile(b"|".join(re.escape(p) for p in patterns))
    triggers = tuple(b for b in (b" ", b'"', b"\t", b"\x0b", b"\x0c") if b != delimiter)

    def find(data: bytes) -> bool:
        return any(t in data for t in triggers) and regex.search(data) is not None

    return find


def _json_line_reject(line: int, doc: str) -> Reject:
    try:
        json.loads(doc)
    except json.JSONDecodeError as exc:
        return Reject(line, "(line)", f"not valid JSON ({exc.msg})")
    except ValueError:
        pass
    else:
        return Reject(line, "(line)", "must be a JSON object")
    return Reject(line, "(line)", "not valid JSON")


def _check_occurred_at(v: Any) -> None:
    parse_event({"occurred_at": v, "user_id": "-", "item_id": "-", "event_type": "-"})


# Why events_from_raw refused a field, in the Python parser's words: each check raises FieldError on the raw
# text. When it does not (PostgreSQL is stricter on a rare form), the generic reason below is used.
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], object], str]] = {
    "occurred_at": (_check_occurred_at, "not an ISO 8601 time or unix seconds"),
    "event_id": (lambda v: _text({"event_id": v}, "event_id", required=False), "is not usable"),
    "user_id": (lambda v: _text({"user_id": v}, "user_id", required=True), "is required"),
    "item_id": (lambda v: _text({"item_id": v}, "item_id", required=True), "is required"),
    "event_type": (lambda v: _text({"event_type": v}, "event_type", required=True), "is required"),
    "value": (lambda v: _number(v, "value"), "not a number"),
    "properties": (lambda v: _json_object(v, "properties"), "not valid JSON"),
    "request_id": (lambda v: _uuid(v, "request_id"), "not a UUID"),
}


def _field_reject(line: int, field: str, raw: str | None) -> Reject:
    check, generic = _FIELD_CHECKS[field]
    try:
        check(raw)
    except FieldError as exc:
        return Reject(line, exc.field, exc.reason)
    return Reject(line, field, f"{generic} ({(raw or '')[:40]!r})")


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    with path.open("w") as fh:
        for r in rejects:
            fh.write(json.dumps({"line": r.line, "field": r.field, "reason": r.reason}) + "\n")


# ---------------------------------------------------------------- embeddings


def read_embeddings(path: Path) -> Iterator[tuple[int, str, list[float]]]:
    """(line, id, vector) from CSV (id, then one column per dimension), JSONL ({"id", "vector"}) or .npy.

    A .npy file holds a structured array with fields ``id`` and ``vector``, or a 2-D float array whose
    ids come from a sibling ``<name>.ids.txt`` (one id per line).
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype.names and {"id", "vector"} <= set(arr.dtype.names):
            for n, rec in enumerate(arr, start=1):
                yield n, str(rec["id"]), [float(x) for x in rec["vector"]]
            return
        ids_path = path.with_suffix(".ids.txt")
        if arr.ndim != 2 or not ids_path.is_file():
            raise ValueError(f"{path}: expected a 2-D array with ids in {ids_path.name}, or fields id/vector")
        ids = [s.strip() for s in ids_path.read_text().splitlines() if s.strip()]
        if len(ids) != arr.shape[0]:
            raise ValueError(f"{path}: {arr.shape[0]} vectors but {len(ids)} ids in {ids_path.name}")
        for n, (i, row) in enumerate(zip(ids, arr, strict=True), start=1):
            yield n, i, row.astype(float).tolist()
        return
    with path.open() as fh:
        if suffix in (".jsonl", ".ndjson"):
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                vec = obj.get("vector", obj.get("embedding"))
                if not isinstance(vec, list):
                    raise ImportFailed(str(path), [Reject(n, "vector", "must be a list of numbers")])
                yield n, str(obj.get("id", obj.get("item_id", obj.get("user_id")))), vec
        elif suffix == ".csv":
            for n, row in enumerate(csv.reader(fh), start=1):
                if not row or (n == 1 and not _is_float(row[-1])):
                    continue  # header
                try:
                    yield n, row[0], [float(x) for x in row[1:]]
                except ValueError:
                    raise ImportFailed(str(path), [Reject(n, "vector", "not a number")]) from None
        else:
            raise ValueError(f"{path}: unknown file type {suffix!r} (expected .csv, .jsonl or .npy)")


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


BULK_INDEX_ROWS = 20_000  # item vectors loaded into a smaller table: the HNSW index is built after the load


def import_embeddings(
    conn: psycopg.Connection[Any],
    target: str,
    rows: Iterable[tuple[int, str, list[float]]],
    *,
    model_version: str = "imported",
    source: str = "vectors",
    bulk_index_rows: int = BULK_INDEX_ROWS,
) -> int:
    """Store item or user vectors; every vector is checked by ``pgrec.check_vector`` (all or nothing).

    A bulk load (at least ``bulk_index_rows`` item vectors, more than the table holds) drops the item HNSW
    index and builds it again after the merge, in the same transaction: inserting into a live index runs at a
    few hundred vectors per second at 1M items, a build after the load is one pass. Readers of
    ``pgrec.item_embeddings`` wait for the import's commit meanwhile."""
    if target not in ("items", "users"):
        raise ValueError("target must be 'items' or 'users'")
    n = 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query("ingest.create_embeddings_stage"))
        with cur.copy("COPY stage_embeddings (line, id, v) FROM STDIN") as copy:
            for line, ident, vec in rows:
                copy.write_row((line, ident, vec))
                n += 1
        cur.execute(query(f"ingest.unknown_embedding_{target}"))
        unknown = cur.fetchall()
        if unknown:
            what = target[:-1]
            raise ImportFailed(source, [Reject(line, "id", f"unknown {what} {i!r}") for line, i in unknown])
        rebuild = False
        if target == "items" and n >= bulk_index_rows:
            have = cur.execute(query("ingest.item_embedding_rows"), {"upto": n}).fetchone()
            rebuild = n > (have[0] if have else 0)
        if rebuild:
            cur.execute(query("ingest.drop_item_index"))
        try:
            cur.execute(query(f"ingest.merge_{target[:-1]}_embeddings"), {"model_version": model_version})
        except psycopg.errors.InvalidParameterValue as exc:
            raise ImportFailed(source, [Reject(0, "vector", str(exc.diag.message_primary))]) from None
        if rebuild:
            cur.execute(query("ingest.index_build_memory"))
            cur.execute(query("ingest.create_item_index"))
    return n
