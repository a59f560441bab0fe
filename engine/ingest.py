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
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
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
    warnings: list[str] = field(default_factory=list)  # e.g. CSV columns pgrec does not read

    @property
    def rows_per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- field parsers (one rule each)


# ASCII whitespace around a value is ignored: the one set both import paths trim (SQL btrim in events_from_raw)
_WS = " \t\n\r\x0b\x0c"


# What PostgreSQL text cannot hold: NUL, and lone surrogates (from JSON escapes, or bytes that are not UTF-8,
# which the readers decode with errors="surrogateescape" so that the row, not the file, is refused).
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def _text_problem(s: str) -> str | None:
    """Why a string cannot be stored as PostgreSQL text, or None."""
    m = _BAD_CHARS.search(s)
    if m is None:
        return None
    c = ord(m.group())
    if c == 0:
        return "holds a NUL character (\\u0000), which PostgreSQL text cannot store"
    if 0xDC80 <= c <= 0xDCFF:
        return f"is not valid UTF-8 (byte 0x{c - 0xDC00:02x})"
    return f"holds an unpaired UTF-16 surrogate (\\u{c:04x}), which is not valid Unicode"


def _json_kind(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, dict):
        return "a JSON object"
    if isinstance(v, list | tuple):
        return "a JSON array"
    return repr(v)


def _ident_text(v: Any, name: str) -> str | None:
    """An id as text: strings as they are, integers (not booleans) as their decimal text, nothing else."""
    if v is None:
        return None
    if isinstance(v, str):
        s = v
    elif isinstance(v, bool | dict | list | tuple):
        raise FieldError(name, f"must be a string, not {_json_kind(v)}")
    elif isinstance(v, _JsonFloat):  # as PostgreSQL reads a JSON number: 1e2 is the integer 100, 1.0 is not
        d = Decimal(v.token)
        exponent = d.as_tuple().exponent
        if not isinstance(exponent, int) or exponent < 0:
            raise FieldError(name, f"must be a string or an integer, not {v.token[:40]}")
        s = format(d, "f")
    elif isinstance(v, float):
        raise FieldError(name, f"must be a string or an integer, not {v!r}")
    else:
        s = str(v)
    problem = _text_problem(s)
    if problem:
        raise FieldError(name, problem)
    return s


def _text(raw: dict[str, Any], name: str, *, required: bool) -> str | None:
    v = _ident_text(raw.get(name), name)
    s = None if v is None else v.strip(_WS)
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
            offset = t.utcoffset()
            if offset is not None and abs(offset) >= timedelta(hours=16):
                raise ValueError(s)  # PostgreSQL's offsets stop at 15:59 (Python's at 23:59), as the SQL check does
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
    try:
        s = json.dumps(v, allow_nan=False, default=str)
    except ValueError:
        problem = _json_problem(v) or "holds a number out of range (NaN or Infinity), which JSON does not allow"
        raise FieldError(name, problem) from None
    except RecursionError:
        raise FieldError(name, "is nested too deeply") from None
    if "\\u0000" in s or "\\ud" in s:  # escapes of NUL or of surrogates (maybe a valid pair): look closer
        found = _json_problem(v)
        if found:
            raise FieldError(name, found)
    return s


class _JsonFloat(float):
    """A JSON number with a fraction or exponent, as the JSON reader found it (``token``: its text)."""

    token: str


def _json_float(token: str) -> float:
    x = _JsonFloat(token)
    x.token = token
    return x


_NON_FINITE = "holds NaN or Infinity, which JSON does not allow"


class _NonFinite(float):
    """NaN, Infinity or -Infinity as a JSON reader found them: Python's json takes them, JSON and PostgreSQL do not."""


def _json_constant(name: str) -> float:
    return _NonFinite(name)


def _json_problem(v: Any) -> str | None:
    """Why a parsed JSON value cannot be stored as jsonb (NaN/Infinity, NUL, lone surrogates), or None."""
    if isinstance(v, str):
        return _text_problem(v)
    if isinstance(v, float):
        return _NON_FINITE if not math.isfinite(v) else None
    if isinstance(v, dict):
        for k, x in v.items():
            problem = (_text_problem(k) if isinstance(k, str) else None) or _json_problem(x)
            if problem:
                return problem
    elif isinstance(v, list | tuple):
        for x in v:
            problem = _json_problem(x)
            if problem:
                return problem
    return None


def _json_line_problem(line: str, obj: dict[str, Any]) -> FieldError | None:
    """A JSONL line's value PostgreSQL's jsonb refuses (both import paths refuse the line), named by its key."""
    if not ("NaN" in line or "Infinity" in line or "\\u0000" in line or "\\ud" in line or "\\uD" in line
            or _BAD_CHARS.search(line)):
        return None
    for key, v in obj.items():
        problem = _text_problem(key) or (
            _NON_FINITE if isinstance(v, _NonFinite) else _json_problem(v))
        if problem:
            return FieldError(key if not _text_problem(key) else "(line)", problem)
    return None


def _categories(v: Any) -> list[str] | None:
    if v is None or v == "":
        return None
    if isinstance(v, str):
        parts = [p.strip() for p in v.split("|")]
    elif isinstance(v, list):
        parts = []
        for p in v:
            if p is None:
                continue
            if isinstance(p, bool | float | dict | list):
                raise FieldError("categories", f"must hold strings, not {_json_kind(p)}")
            parts.append(str(p).strip())
    else:
        raise FieldError("categories", "must be '|'-separated text or a list")
    for p in parts:
        problem = _text_problem(p)
        if problem:
            raise FieldError("categories", problem)
    return [p for p in parts if p]


def _number(v: Any, name: str) -> float | None:
    if _missing(v):
        return None
    try:
        if isinstance(v, bool):
            raise FieldError(name, f"not a number ({json.dumps(v)!r})")
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
    if t.timestamp() < 0:  # as pgrec.track_event: every month of events is a partition
        raise FieldError("occurred_at", f"{t.isoformat()} is before 1970-01-01")
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


# a field may be as long as PostgreSQL allows (1 GB), not the csv module's default of 128 KiB
csv.field_size_limit(1 << 30)


def read_records(path: Path, progress: Progress | None = None) -> Iterator[Record]:
    """(line, fields) from a CSV file with a header row or a JSONL file; line numbers count from 1.

    ``progress`` is called with 1 per record read.
    """
    suffix = path.suffix.lower()
    # bytes that are not UTF-8 become lone surrogates, which the field parsers refuse naming the line and field
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        if suffix in (".jsonl", ".ndjson", ".json"):
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                if progress:
                    progress(1)
                obj, error = _json_line(line)
                yield n, obj if error is None else {"__error__": error}
        elif suffix in (".csv", ".tsv"):
            # strict: a quote in the middle of a field is an error, not a character to guess about
            start = [0, 0]  # [physical lines read, the first non-blank one of the record being read (0: none yet)]

            def lines() -> Iterator[str]:
                for text in fh:
                    start[0] += 1
                    if not start[1] and text.strip("\r\n"):
                        start[1] = start[0]
                    yield text

            reader = csv.DictReader(lines(), delimiter="\t" if suffix == ".tsv" else ",", strict=True)
            try:
                _ = reader.fieldnames  # the header
            except csv.Error as exc:
                raise ImportFailed(str(path), [Reject(1, "(header)", f"malformed CSV ({exc})")]) from None
            while True:
                start[1] = 0
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    begin = start[1] or start[0]  # the line the bad record starts on (blank lines skipped)
                    if "end of data" in str(exc):
                        # the rest of the file went into one quoted field: no row after it can be trusted
                        raise ImportFailed(str(path), [Reject(begin, "(line)", "a quoted field that starts on this "
                                                              "line is not closed before the end of the file")]) from None
                    if progress:
                        progress(1)
                    yield begin, {"__error__": FieldError("(line)", f"malformed CSV ({exc})")}
                    continue
                if progress:
                    progress(1)
                if None in row:
                    yield reader.line_num, {"__error__": FieldError("(line)", "has more fields than the header")}
                    continue
                yield reader.line_num, row
        else:
            raise ValueError(f"{path}: unknown file type {suffix!r} (expected .csv, .tsv or .jsonl)")


def _json_line(line: str, *, number_tokens: bool = True) -> tuple[dict[str, Any], FieldError | None]:
    """One JSONL line as an object, or why it is refused (the same reasons on both import paths).

    ``number_tokens``: numbers with a fraction or exponent keep their text (``_JsonFloat``), for ids."""
    try:
        obj = json.loads(line, parse_constant=_json_constant, parse_float=_json_float if number_tokens else None)
    except json.JSONDecodeError as exc:
        return {}, FieldError("(line)", f"not valid JSON ({exc.msg})")
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits, or deep nesting
        return {}, FieldError("(line)", f"not valid JSON ({str(exc)[:80] or type(exc).__name__})")
    if not isinstance(obj, dict):
        return {}, FieldError("(line)", "must be a JSON object")
    return obj, _json_line_problem(line, obj)


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
            cur.execute(query(f"ingest.{spec.merge}_last"))  # sql/queries/ingest.sql merge_items_*
            for step in ("new", "given"):
                cur.execute(query(f"ingest.{spec.merge}_{step}"))
                result.stored += cur.rowcount
            result.duplicates = result.read - len(result.rejected) - result.stored
    result.rejected.sort(key=lambda r: r.line)
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
    rejects_to = rejects_path or path.with_suffix(path.suffix + ".rejects.jsonl")
    if skip_invalid or rejects_path is not None:  # before anything is imported: the rejects must have a place
        check_rejects_path(rejects_to, path)
    warnings = check_file(kind, path)
    # one transaction around the import and the rejects file: a rejects file that cannot be written undoes the import
    with conn.transaction():
        if kind == "events" and _fast_path_applies(conn, path):
            result = _import_events_file(conn, path, skip_invalid=skip_invalid,
                                         create_missing_items=create_missing_items, progress=progress)
        else:
            result = import_records(
                conn, kind, read_records(path, progress), source=str(path), skip_invalid=skip_invalid,
                create_missing_items=create_missing_items,
            )
        result.warnings.extend(warnings)
        if result.rejected or skip_invalid or rejects_path is not None:
            # written even when empty, so a rejects file always describes the latest import of this file
            one_per_line = result.checked_by == "sql" or path.suffix.lower() not in (".csv", ".tsv")
            write_rejects(rejects_to, result.rejected, row_texts(path, {r.line for r in result.rejected},
                                                                 records_are_lines=one_per_line))
    return result


def check_rejects_path(path: Path, source: Path | None = None) -> None:
    """Raise ValueError unless a rejects file can be written at ``path`` (checked before an import starts)."""
    where = f"rejects file {path}"
    if path.is_dir():
        raise ValueError(f"{where}: is a directory (give a file name)")
    parent = path.parent
    if not parent.exists():
        raise ValueError(f"{where}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{where}: {parent} is not a directory")
    if source is not None and path.exists() and path.resolve() == source.resolve():
        raise ValueError(f"{where}: is the file being imported")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise ValueError(f"{where}: not writable (permission denied)")


def _is_blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (and a UTF-8 byte order mark); reads only up to the first text."""
    with path.open("rb") as fh:
        head = fh.read(3)
        if head != b"\xef\xbb\xbf":
            fh.seek(0)
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def check_file(kind: str, path: Path) -> list[str]:
    """Problems of the file as a whole, before any row is read: an empty file, or a CSV header without a required
    column, refuse the whole file whatever ``skip_invalid`` says (ValueError / ImportFailed on line 1). Returns
    warnings: CSV columns pgrec does not read (JSONL keys it does not read are ignored in the same way)."""
    suffix = path.suffix.lower()
    if _is_blank(path):
        what = "no header row" if suffix in (".csv", ".tsv") else "no records"
        raise ValueError(f"{path}: the file is empty ({what})")
    if suffix not in (".csv", ".tsv"):
        return []
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
        header: list[str] = []
        for row in reader:  # the first row that is not empty, as csv.DictReader takes it
            if row:
                header = row
                break
        line = reader.line_num
    spec = KINDS[kind]
    missing = [c for c in _REQUIRED[kind] if c not in header]
    unknown = [h for h in header if h not in spec.columns]
    show = ", ".join(h if h.isprintable() and h.strip(_WS) == h and h else repr(h) for h in unknown)
    if missing:
        reason = f"missing the required column{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        if unknown:
            reason += f" (columns pgrec does not read: {show})"
        reason += f"; expected {', '.join(spec.columns)}"
        raise ImportFailed(str(path), [Reject(line, "(header)", reason)])
    if unknown:
        return [f"{path}: ignoring column{'s' if len(unknown) > 1 else ''} pgrec does not read: {show} "
                f"(it reads {', '.join(spec.columns)})"]
    return []


_REQUIRED = {"items": ("item_id",), "users": ("user_id",),
             "events": ("user_id", "item_id", "event_type", "occurred_at")}


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
    result.rejected.sort(key=lambda r: r.line)
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
            if fh.read(3) != b"\xef\xbb\xbf":  # a UTF-8 byte order mark is skipped, as the Python reader does
                fh.seek(0)
            _copy_chunks(cur, fh, sql.SQL(query("ingest.copy_lines")), progress)
            padded = True  # JSON puts spaces everywhere; the values themselves are checked by SQL
            cur.execute(query("ingest.events_raw_from_lines"))
            result.read = cur.rowcount
            cur.execute(query("ingest.bad_json_lines"))
            bad_lines = cur.fetchall()
            result.read += len(bad_lines)
            # ids that are not JSON strings or integers (->> gave the text of true, 1.5, {...}): refused like
            # the Python reader does, and taken out before the fields are cast
            cur.execute(query("ingest.json_id_types"))
            bad_ids = cur.fetchall()
            if bad_ids:
                cur.execute(query("ingest.drop_raw_lines"), {"lines": [line for line, _ in bad_ids]})
            result.rejected.extend(_json_line_reject(line, doc) for line, doc in [*bad_lines, *bad_ids])
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
        text = header_line.removeprefix(b"\xef\xbb\xbf").decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise _NotCopyable from None
    # a header holding a carriage return: the file's line ends are CRs, and the record count checks below count
    # newlines: the Python reader takes such a file
    if not text or text.count('"') % 2 or "\r" in text:
        raise _NotCopyable
    try:
        header = next(csv.reader([text], delimiter=delimiter))
    except csv.Error:
        raise _NotCopyable from None
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
    partial = b""  # the previous chunk's last, unfinished line
    padded = False
    padding_in = _padding_finder(delimiter)
    stray_in = _stray_quote_finder(delimiter)
    with cur.copy(statement) as copy:
        while chunk := fh.read(_CHUNK):
            seam = last + chunk
            # COPY reads a line holding only \. as the end of the data, and a quote anywhere in a field as the
            # start or end of quoting (`"a"x` is `ax`, `a""b` is `ab`), where the Python reader refuses the first
            # and keeps the quotes of the second: let the Python reader handle such a file
            lines = partial + chunk
            cut = lines.rfind(b"\n") + 1
            partial = lines[cut:]
            # a line longer than a chunk (no newline in sight: CR line ends, one huge line) is no events file COPY
            # should take; carrying it on would re-scan it with every chunk
            if b"\\." in seam or stray_in(lines[:cut]) or len(partial) > _CHUNK:
                raise _NotCopyable
            padded = padded or padding_in(seam)
            n = chunk.count(b"\n")
            newlines += n
            last = chunk[-1:]
            copy.write(chunk)
            if progress:
                progress(n)
    if stray_in(partial):  # the last line, without a line end
        raise _NotCopyable
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


def _stray_quote_finder(delimiter: bytes) -> Callable[[bytes], bool]:
    """Whether whole lines of CSV / TSV hold a quote outside a well-formed quoted value: every value of a line
    must be bare (no quote at all) or quoted from end to end ("..." with "" for a quote inside). The csv module
    writes nothing else on a line; anything else COPY and the Python reader read differently (`"a"x`, `a""b`,
    `"a,"x`, `x",y"`). A quoted value spanning lines fails too: those files take the Python reader anyway."""
    if not delimiter:
        return lambda data: False
    d = re.escape(delimiter)
    value = b'(?:[^"\r\n' + d + b']*|"(?:[^"\n]|"")*")'
    # a line (MULTILINE) holding a quote whose values do not all match
    regex = re.compile(b'^(?!' + value + b'(?:' + d + value + b')*\r?$)[^\n]*"', re.MULTILINE)
    return lambda data: b'"' in data and regex.search(data) is not None


def _json_line_reject(line: int, doc: str) -> Reject:
    """Why a JSONL line SQL refused is refused, in the slow path's words (it reads the line the same way)."""
    obj, error = _json_line(doc)
    if error is None:
        try:
            parse_event(obj)
        except FieldError as exc:
            error = exc
    if error is None:
        return Reject(line, "(line)", "not valid JSON")
    return Reject(line, error.field, error.reason)


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


def row_texts(path: Path, lines: set[int], *, records_are_lines: bool) -> dict[int, str]:
    """The original text of the records that end on ``lines`` (without the line end), to write beside the rejects.

    ``records_are_lines``: JSONL, or a CSV file the fast path read (no record spans lines): a byte scan. Otherwise
    the CSV file is read again with the reader the import used, keeping every physical line of each record.
    Bytes that are not UTF-8 are written as \\xNN escapes."""
    out: dict[int, str] = {}
    if not lines:
        return out
    last = max(lines)
    if records_are_lines:
        with path.open("rb") as fh:
            for n, raw in enumerate(fh, start=1):
                if n in lines:
                    out[n] = _show_bytes(raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw)
                if n >= last:
                    break
        return out
    buf: list[str] = []

    def physical(fh: Iterable[str]) -> Iterator[str]:
        for text in fh:
            buf.append(text)
            yield text

    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as text_fh:
        reader = csv.reader(physical(text_fh), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        for _ in reader:
            if reader.line_num in lines:
                out[reader.line_num] = _show_bytes("".join(buf).encode("utf-8", "surrogateescape"))
            buf.clear()
            if reader.line_num >= last:
                break
    return out


def _show_bytes(raw: bytes) -> str:
    return raw.rstrip(b"\r\n").decode("utf-8", "backslashreplace")


def write_rejects(path: Path, rejects: list[Reject], rows: dict[int, str] | None = None) -> None:
    """One JSON object per reject, in line order: line, field, reason and (when known) the row's original text.

    Written to a temporary file beside ``path`` and renamed: a failed write leaves no half file."""
    rows = rows or {}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for r in sorted(rejects, key=lambda r: r.line):
                rec: dict[str, Any] = {"line": r.line, "field": r.field, "reason": r.reason}
                if r.line in rows:
                    rec["row"] = rows[r.line]
                fh.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    source = str(path)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        if suffix in (".jsonl", ".ndjson"):
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                obj, error = _json_line(line, number_tokens=False)
                if error is not None:
                    raise ImportFailed(source, [Reject(n, error.field, error.reason)])
                key = next((k for k in ("id", "item_id", "user_id") if k in obj), "id")
                vec = obj.get("vector", obj.get("embedding"))
                try:
                    ident = _text(obj, key, required=True)
                    if not isinstance(vec, list) or not all(type(x) in _VECTOR_TYPES for x in vec):
                        raise FieldError("vector", "must be a list of numbers")
                except FieldError as exc:
                    raise ImportFailed(source, [Reject(n, exc.field, exc.reason)]) from None
                assert ident is not None
                yield n, ident, vec
        elif suffix == ".csv":
            reader = csv.reader(fh)
            for row in reader:
                n = reader.line_num
                if not row or (n == 1 and not _is_float(row[-1])):
                    continue  # header
                try:
                    ident = _text({"id": row[0]}, "id", required=True)
                    assert ident is not None
                    yield n, ident, [float(x) for x in row[1:]]
                except FieldError as exc:
                    raise ImportFailed(source, [Reject(n, exc.field, exc.reason)]) from None
                except ValueError:
                    raise ImportFailed(source, [Reject(n, "vector", "not a number")]) from None
        else:
            raise ValueError(f"{path}: unknown file type {suffix!r} (expected .csv, .jsonl or .npy)")


_VECTOR_TYPES = frozenset({int, float, type(None)})  # a JSON vector's elements (null: check_vector names it)



def _bad_vectors(conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], target: str,
                 failure: psycopg.errors.DataError) -> list[Reject]:
    """The lines of the vectors the merge refused, with pgrec.check_vector's reason for each."""
    what = target[:-1]
    bad: list[Reject] = []
    for line, ident, vec in cur.execute(query("ingest.suspect_vectors")).fetchall():
        try:
            with conn.transaction():
                cur.execute(query("ingest.check_vector"), {"what": what, "id": ident, "v": vec})
        except psycopg.errors.InvalidParameterValue as exc:
            bad.append(Reject(line, "vector", str(exc.diag.message_primary)))
        except psycopg.errors.DataError:
            bad.append(Reject(line, "vector", f'embedding for {what} "{ident}" has a value outside the range '
                                              "of a 4-byte float (about 1.2e-38 to 3.4e38, or 0)"))
    if not bad:  # not found again (should not happen): the server's words, without a line
        bad.append(Reject(0, "vector", str(failure.diag.message_primary or failure)))
    return bad


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
            with conn.transaction():  # a savepoint: after a refused vector, find its line
                cur.execute(query(f"ingest.merge_{target[:-1]}_embeddings"), {"model_version": model_version})
        except psycopg.errors.DataError as exc:
            raise ImportFailed(source, _bad_vectors(conn, cur, target, exc)) from None
        if rebuild:
            cur.execute(query("ingest.index_build_memory"))
            cur.execute(query("ingest.create_item_index"))
    return n
