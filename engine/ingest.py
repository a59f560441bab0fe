"""Bulk imports: items, users, events and embeddings from CSV / JSONL (or records), all-or-nothing.

Every row is parsed and checked here (field by field, with the line number), COPYed into a temporary
staging table and merged by one set-based statement from ``sql/queries/ingest.sql``. A file with a bad row
imports nothing unless ``skip_invalid`` is set, in which case the bad rows go to a rejects file with reasons.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

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

    @property
    def rows_per_second(self) -> float:
        return self.read / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- field parsers (one rule each)


def _text(raw: dict[str, Any], name: str, *, required: bool) -> str | None:
    v = raw.get(name)
    if v is None or (isinstance(v, str) and v.strip() == ""):
        if required:
            raise FieldError(name, "is required")
        return None
    s = str(v).strip()
    if len(s) > 256:
        raise FieldError(name, "is longer than 256 characters")
    return s


def parse_time(v: Any, name: str, *, required: bool) -> datetime | None:
    """ISO 8601 (naive times are UTC) or unix seconds."""
    if v is None or (isinstance(v, str) and v.strip() == ""):
        if required:
            raise FieldError(name, "is required")
        return None
    try:
        if isinstance(v, int | float) or (isinstance(v, str) and v.strip().lstrip("-").replace(".", "", 1).isdigit()):
            t = datetime.fromtimestamp(float(v), tz=UTC)
        else:
            t = datetime.fromisoformat(str(v).strip().replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise FieldError(name, f"not an ISO 8601 time or unix seconds ({str(v)[:40]!r})") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t


def _json_object(v: Any, name: str) -> str | None:
    if v is None or v == "":
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
    if v is None or v == "":
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
    if v is None or v == "":
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
    with path.open("rb") as fh:
        n = sum(1 for _ in fh)
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
        cur.execute(query(f"ingest.{spec.stage}"))
        cur.execute("SET LOCAL work_mem = '256MB'")
        cols = ", ".join(("line", *spec.columns))
        with cur.copy(f"COPY {spec.table} ({cols}) FROM STDIN") as copy:
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
        if result.rejected and not skip_invalid:
            raise ImportFailed(source, result.rejected)
        if kind == "events":
            _check_event_references(cur, result, skip_invalid, create_missing_items, source)
            cur.execute(query("ingest.event_time_range"))
            lo, hi = cur.fetchone() or (None, None)
            cur.execute(query("ingest.ensure_partitions"), {"lo": lo, "hi": hi})
            cur.execute(query("ingest.merge_events"))
            _seen, stored = cur.fetchone() or (0, 0)
            result.stored = int(stored)
            result.duplicates = result.read - len(result.rejected) - result.stored
        else:
            cur.execute(query(f"ingest.{spec.merge}"))
            result.stored = cur.rowcount
            result.duplicates = result.read - len(result.rejected) - result.stored
    result.seconds = time.perf_counter() - t0
    return result


def _check_event_references(
    cur: psycopg.Cursor[Any], result: ImportResult, skip_invalid: bool, create_missing_items: bool, source: str
) -> None:
    bad: list[Reject] = []
    cur.execute(query("ingest.unknown_event_types"))
    bad += [Reject(line, "event_type", f"unknown event type {t!r}") for line, t in cur.fetchall()]
    if create_missing_items:
        cur.execute(query("ingest.create_missing_items"))
    else:
        cur.execute(query("ingest.unknown_items"))
        bad += [
            Reject(line, "item_id", f"unknown item {i!r} (import items first or pass --create-missing-items)")
            for line, i in cur.fetchall()
        ]
    if bad:
        if not skip_invalid:
            raise ImportFailed(source, sorted(bad, key=lambda r: r.line))
        cur.execute("DELETE FROM stage_events WHERE line = ANY(%s)", ([r.line for r in bad],))
        result.rejected.extend(bad)
    cur.execute(query("ingest.create_missing_users"))


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
    result = import_records(
        conn, kind, read_records(path, progress), source=str(path), skip_invalid=skip_invalid,
        create_missing_items=create_missing_items,
    )
    if result.rejected:
        write_rejects(rejects_path or path.with_suffix(path.suffix + ".rejects.jsonl"), result.rejected)
    return result


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


def import_embeddings(
    conn: psycopg.Connection[Any],
    target: str,
    rows: Iterable[tuple[int, str, list[float]]],
    *,
    model_version: str = "imported",
    source: str = "vectors",
) -> int:
    """Store item or user vectors; every vector is checked by ``pgrec.check_vector`` (all or nothing)."""
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
        try:
            cur.execute(query(f"ingest.merge_{target[:-1]}_embeddings"), {"model_version": model_version})
        except psycopg.errors.InvalidParameterValue as exc:
            raise ImportFailed(source, [Reject(0, "vector", str(exc.diag.message_primary))]) from None
    return n
