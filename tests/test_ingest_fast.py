"""The fast path of events files (raw COPY, one SQL pass that casts and checks) against the Python parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import TestDB

from engine import ingest

ITEMS_CSV = "item_id\na\nb\nc\n"

GOOD_CSV = """event_id,user_id,item_id,event_type,occurred_at,value
e1,u1,a,click,2024-02-01T10:00:00Z,
e2,u1,b,rating,2024-02-01 11:00:00,5
e3,u2,a,rating,2024-02-02T11:00:00.123456+02:00,1
,u2,b,view,1706868000,
e5, u3 ,c,like,2024-02-03,
"""

# one bad field per line, in every way a field can be bad (line 2 is good)
BAD_CSV = """event_id,user_id,item_id,event_type,occurred_at,value,properties,request_id
ok,u1,a,click,2024-02-01T10:00:00Z,,,
b1,u1,a,click,not-a-time,,,
b2,u1,a,click,yesterday,,,
b3,u1,a,click,2999-01-01T00:00:00Z,,,
b4,u1,a,click,,,,
b5,,a,click,2024-02-01T10:00:00Z,,,
b6,u1,,click,2024-02-01T10:00:00Z,,,
b7,u1,a,,2024-02-01T10:00:00Z,,,
{long},u1,a,click,2024-02-01T10:00:00Z,,,
b9,u1,a,click,2024-02-01T10:00:00Z,abc,,
b10,u1,a,click,2024-02-01T10:00:00Z,NaN,,
b11,u1,a,click,2024-02-01T10:00:00Z,,{{oops,
b12,u1,a,click,2024-02-01T10:00:00Z,,[1],
b13,u1,a,click,2024-02-01T10:00:00Z,,,not-a-uuid
b14,u1,a,poke,2024-02-01T10:00:00Z,,,
b15,u1,ghost,click,2024-02-01T10:00:00Z,,,
b16,u1,a,click,2024-02-01 10:00 Europe/Berlin,,,
b17,u1,a,click,2024-02-01T10,,,
b18,u1,a,click,2024-02-01+02:00,,,
b19,u1,a,click,2024-02-01T24:00:00,,,
""".format(long="x" * 300)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _setup(db: TestDB, tmp_path: Path) -> None:
    ingest.import_file(db.conn, "items", _write(tmp_path / "items.csv", ITEMS_CSV))


def _events(db: TestDB) -> list[tuple[Any, ...]]:
    return db.conn.execute(
        "SELECT u.user_id, i.item_id, e.event_id, t.name, e.occurred_at, e.value, e.properties, e.request_id "
        "FROM pgrec.events e JOIN pgrec.users u USING (user_key) JOIN pgrec.items i USING (item_key) "
        "JOIN pgrec.event_types t USING (type_id) ORDER BY 1, 5, 2").fetchall()


def test_csv_takes_the_sql_path_and_reads_times_values_and_padding(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", GOOD_CSV))
    assert (r.checked_by, r.read, r.stored, r.duplicates) == ("sql", 5, 5, 0)
    rows = _events(db)
    assert [(u, i, e) for u, i, e, *_ in rows] == [("u1", "a", "e1"), ("u1", "b", "e2"), ("u2", "a", "e3"),
                                                   ("u2", "b", None), ("u3", "c", "e5")]
    times = [x[4].isoformat() for x in rows]
    assert times == ["2024-02-01T10:00:00+00:00", "2024-02-01T11:00:00+00:00", "2024-02-02T09:00:00.123456+00:00",
                     "2024-02-02T10:00:00+00:00", "2024-02-03T00:00:00+00:00"]
    assert [float(x[5]) if x[5] is not None else None for x in rows] == [None, 5.0, 1.0, None, None]
    again = ingest.import_file(db.conn, "events", tmp_path / "ev.csv")
    assert (again.stored, again.duplicates) == (0, 5)


def test_bad_rows_get_the_python_parsers_reasons(db: TestDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _setup(db, tmp_path)
    path = _write(tmp_path / "bad.csv", BAD_CSV)
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "events", path)
    assert db.scalar("SELECT count(*) FROM pgrec.events") + db.scalar("SELECT count(*) FROM pgrec.users") == 0
    fast = [(r.line, r.field, r.reason) for r in failed.value.rejects]
    assert [(line, f) for line, f, _ in fast] == [
        (3, "occurred_at"), (4, "occurred_at"), (5, "occurred_at"), (6, "occurred_at"), (7, "user_id"),
        (8, "item_id"), (9, "event_type"), (10, "event_id"), (11, "value"), (12, "value"), (13, "properties"),
        (14, "properties"), (15, "request_id"), (18, "occurred_at"), (19, "occurred_at"), (20, "occurred_at"),
        (21, "occurred_at")]
    assert fast[0][2] == "not an ISO 8601 time or unix seconds ('not-a-time')"
    assert "in the future" in fast[2][2] and fast[3][2] == "is required"
    assert fast[9][2] == "must be a finite number" and fast[10][2].startswith("not valid JSON (")
    # the same file through the Python parser (PostgreSQL 15, records): the same rejects, word for word
    monkeypatch.setattr(ingest, "_fast_path_applies", lambda conn, path: False)
    with pytest.raises(ingest.ImportFailed) as slow:
        ingest.import_file(db.conn, "events", path)
    assert [(r.line, r.field, r.reason) for r in slow.value.rejects] == fast


def test_skip_invalid_same_result_on_both_paths(db: TestDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _setup(db, tmp_path)
    path = _write(tmp_path / "bad.csv", BAD_CSV)
    r = ingest.import_file(db.conn, "events", path, skip_invalid=True, rejects_path=tmp_path / "fast.jsonl")
    assert (r.checked_by, r.stored, len(r.rejected)) == ("sql", 1, 19)
    # unknown type and item come from the reference check, after the field checks; rejects are in line order
    assert [(x.line, x.field) for x in r.rejected][13:15] == [(16, "event_type"), (17, "item_id")]
    assert [x.line for x in r.rejected] == sorted(x.line for x in r.rejected)
    fast_rows = _events(db)
    db.conn.execute("TRUNCATE pgrec.events, pgrec.event_ids, pgrec.users CASCADE")
    monkeypatch.setattr(ingest, "_fast_path_applies", lambda conn, path: False)
    s = ingest.import_file(db.conn, "events", path, skip_invalid=True, rejects_path=tmp_path / "slow.jsonl")
    assert (s.checked_by, s.stored) == ("python", 1)
    assert sorted((x.line, x.field, x.reason) for x in s.rejected) == sorted(
        (x.line, x.field, x.reason) for x in r.rejected)
    assert _events(db) == fast_rows
    assert (tmp_path / "fast.jsonl").read_text().count("\n") == 19


def test_jsonl_on_the_sql_path(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    lines = [
        json.dumps({"event_id": "j1", "user_id": "u1", "item_id": "a", "event_type": "rating", "value": 4,
                    "occurred_at": "2024-03-01T00:00:00Z", "properties": {"device": "tv"},
                    "request_id": "6f1c1d2e-8a8b-4c4d-9e9f-000000000001"}),
        "",
        "{broken",
        json.dumps([1, 2]),
        json.dumps({"user_id": "u2", "item_id": "b", "event_type": "view", "occurred_at": 1709251200}),
        json.dumps({"user_id": "u2", "item_id": "b", "event_type": "view", "occurred_at": "soon"}),
    ]
    path = _write(tmp_path / "ev.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "events", path)
    assert [(r.line, r.field) for r in failed.value.rejects] == [(3, "(line)"), (4, "(line)"), (6, "occurred_at")]
    assert failed.value.rejects[0].reason.startswith("not valid JSON (")
    assert failed.value.rejects[1].reason == "must be a JSON object"
    r = ingest.import_file(db.conn, "events", path, skip_invalid=True)
    assert (r.checked_by, r.read, r.stored, len(r.rejected)) == ("sql", 5, 2, 3)
    row = db.conn.execute("SELECT value, properties, request_id::text, polarity FROM pgrec.events "
                          "WHERE event_id = 'j1'").fetchone()
    assert row == (4, {"device": "tv"}, "6f1c1d2e-8a8b-4c4d-9e9f-000000000001", 1)


def test_header_order_extra_columns_and_tsv(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    csv_text = "note,occurred_at,item_id,user_id,event_type,source\nhi,2024-02-01T10:00:00Z,a,u1,click,web\n"
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", csv_text))
    assert (r.checked_by, r.stored) == ("sql", 1)
    tsv = "user_id\titem_id\tevent_type\toccurred_at\nu1\tb\tview\t2024-02-01T10:00:00Z\n"
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "ev.tsv", tsv))
    assert (r.checked_by, r.stored) == ("sql", 1)


@pytest.mark.parametrize(
    ("text", "line", "field", "reason"),
    [
        # a quoted newline: records and lines differ, the Python reader reports the line the record ends on
        ('user_id,item_id,event_type,occurred_at,properties\nu1,a,click,2024-02-01T10:00:00Z,"{\n}"\n'
         "u1,a,click,bad,\n", 4, "occurred_at", "not an ISO 8601 time"),
        ("user_id,item_id,event_type,occurred_at\nu1,a,click,2024-02-01T10:00:00Z,extra\n", 2, "(line)",
         "has more fields than the header"),
        # COPY would take a line holding only \. for the end of the data
        ("user_id,item_id,event_type,occurred_at\n\\.\nu1,a,click,bad\n", 2, "occurred_at", "is required"),
    ],
)
def test_files_copy_cannot_read_go_through_python(db: TestDB, tmp_path: Path, text: str, line: int, field: str,
                                                  reason: str) -> None:
    _setup(db, tmp_path)
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", text))
    first = failed.value.rejects[0]
    assert (first.line, first.field) == (line, field) and reason in first.reason
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 0


def test_known_and_repeated_events_fall_back_to_the_merge(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    first = "event_id,user_id,item_id,event_type,occurred_at\ne1,u1,a,click,2024-02-01T10:00:00Z\n"
    assert ingest.import_file(db.conn, "events", _write(tmp_path / "a.csv", first)).stored == 1
    # a known id, an id twice in the file (the first line wins), a natural key twice, and new rows
    text = ("event_id,user_id,item_id,event_type,occurred_at\n"
            "e1,u1,a,click,2024-02-01T10:00:00Z\n"
            "e2,u1,b,click,2024-02-01T11:00:00Z\n"
            "e2,u1,c,click,2024-02-01T12:00:00Z\n"
            ",u2,a,view,2024-02-01T10:00:00Z\n"
            ",u2,a,view,2024-02-01T10:00:00Z\n"
            "e3,u2,b,view,2024-02-01T10:00:00Z\n")
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "b.csv", text))
    assert (r.stored, r.duplicates) == (3, 3)
    assert db.scalar("SELECT string_agg(i.item_id || ':' || coalesce(e.event_id, '-'), ' ' ORDER BY e.occurred_at, "
                     "e.event_id) FROM pgrec.events e JOIN pgrec.items i USING (item_key)") == "a:e1 b:e3 a:- b:e2"
    # new users only, but a natural key twice in the file: stays on the fast path, stored once
    dup = ("user_id,item_id,event_type,occurred_at\nu9,a,view,2024-02-05T00:00:00Z\n"
           "u9,a,view,2024-02-05T00:00:00Z\nu9,b,view,2024-02-05T00:00:00Z\n")
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "c.csv", dup))
    assert (r.stored, r.duplicates) == (2, 1)
    assert db.scalar("SELECT count(*) FROM pgrec.item_daily_counts WHERE day = '2024-02-05'") == 2


def test_partitions_only_for_months_with_events(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    text = "user_id,item_id,event_type,occurred_at\nu1,a,view,0\nu1,b,view,2024-02-01T00:00:00Z\n"
    assert ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", text)).stored == 2
    assert db.scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgrec.events'::regclass") == 2


def test_bench_ingest_prints_rates(db: TestDB, tmp_path: Path) -> None:
    from engine.bench import ingest as bench

    lines = list(bench.run(db.settings, events=1500, single=40, workdir=tmp_path))
    bulk = next(x for x in lines if x.startswith("bulk import"))
    assert "checked by sql" in bulk and "events/s" in bulk and "rows per CPU-second" in bulk
    assert any(x.startswith("same file again: 0 new rows") for x in lines)
    assert sum("track_event" in x and "events/s" in x for x in lines) == 3


def test_padding_is_seen_wherever_it_is(db: TestDB, tmp_path: Path) -> None:
    """The reader skips SQL's trimming only for files with no whitespace at any value's edge."""
    import csv
    import io
    import random

    rnd = random.Random(7)
    for delimiter in (",", "\t"):
        patterns = ingest._padding_patterns(delimiter.encode())
        for _ in range(300):
            rows = [[rnd.choice(["u1", "a b", "x,y", 'q"q', "", "2024-01-01T00:00:00Z"]) for _ in range(4)]
                    for _ in range(3)]
            padded_row, padded_col = rnd.randrange(3), rnd.randrange(4)
            ws = rnd.choice([" ", "\t", "\x0b", "\x0c", "  ", " \t"])
            value = rows[padded_row][padded_col]
            rows[padded_row][padded_col] = ws + value if rnd.random() < 0.5 else value + ws
            out = io.StringIO()
            csv.writer(out, delimiter=delimiter, lineterminator=rnd.choice(["\n", "\r\n"])).writerows(rows)
            data = out.getvalue().encode()
            if rnd.random() < 0.3:
                data = data.rstrip(b"\r\n")
            seam = b"\n" + data
            found = any(p in seam for p in patterns) or data[-1:] in ingest._WS_BYTES
            assert found, data
    # and end to end: padded ids are trimmed, the same as the Python reader does
    _setup(db, tmp_path)
    text = ("user_id,item_id,event_type,occurred_at\n u1,a ,click,2024-02-01T10:00:00Z\n"
            '"u1\t", b,view, 2024-02-01T10:00:00Z \nu2,c,view,2024-02-01T10:00:00Z \t')
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", text))
    assert (r.checked_by, r.stored) == ("sql", 3)
    assert [(u, i) for u, i, *_ in _events(db)] == [("u1", "a"), ("u1", "b"), ("u2", "c")]


def test_stray_quotes_are_read_as_the_python_reader_reads_them(db: TestDB, tmp_path: Path) -> None:
    """COPY takes a quote anywhere in a field for quoting (`"a"x` is `ax`, `a""b` is `ab`, `x",y"` is one value
    `x,y`); a file with a line whose values are not all bare or quoted end to end goes to the Python reader, which
    refuses or keeps such quotes as it always did. Files the csv module writes, quotes in values included, stay
    on the SQL path."""
    import csv
    import io
    import random

    rnd = random.Random(11)
    for delimiter in (",", "\t"):
        d = delimiter.encode()
        stray_in = ingest._stray_quote_finder(d)
        for _ in range(300):
            rows = [[rnd.choice(["u1", 'q"q', '""', '"', '{"a": "b"}', "x,y", "x\ty", "", 'a""b']) for _ in range(4)]
                    for _ in range(3)]
            out = io.StringIO()
            csv.writer(out, delimiter=delimiter, lineterminator=rnd.choice(["\n", "\r\n"])).writerows(rows)
            data = out.getvalue().encode()
            assert not stray_in(data), data
            # one bad value in place of a good one: a quote after a closing quote's text, quotes in a bare value,
            # a quoted value with text after it (also after a delimiter inside it), a quote closing mid-value
            bad_value = rnd.choice([b'"a"x', b'a"b', b'a""b', b'""ax', b'"a' + d + b'"x', b'x"' + d + b'y"'])
            lines = data.splitlines(keepends=True)
            row = rnd.randrange(len(lines))
            values = lines[row].rstrip(b"\r\n").split(d) if b'"' not in lines[row] else [b"u1"] * 4
            values[rnd.randrange(len(values))] = bad_value
            lines[row] = d.join(values) + b"\n"
            assert stray_in(b"".join(lines)), b"".join(lines)

    _setup(db, tmp_path)
    head = "user_id,item_id,event_type,occurred_at\n"
    ok = "u1,a,click,2024-02-01T10:00:00Z\n"
    for value, field, reason in (('"a"x', "(line)", "expected after"), ('"a,"x', "(line)", "expected after"),
                                 ('a"b"c', "item_id", 'a"b"c'), ('a""b', "item_id", 'a""b'),
                                 ('x",y"', "(line)", "more fields")):
        # the bad line last, after more than a chunk's worth of good ones: the check reads every chunk
        text = head + ok * 40_000 + f"u1,{value},click,2024-02-01T10:00:00Z\n"
        with pytest.raises(ingest.ImportFailed) as failed:
            ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", text))
        first = failed.value.rejects[0]
        assert (first.line, first.field) == (40_002, field) and reason in first.reason, (value, first)
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 0
    # a file whose line ends are carriage returns only: the Python reader takes it (before: a csv.Error traceback)
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "cr.csv", head.replace("\n", "\r")
                                                     + "u9,b,click,2024-02-01T10:00:00Z\r"))
    assert (r.checked_by, r.stored) == ("python", 1)
    db.conn.execute("DELETE FROM pgrec.events")
    # the last line without a line end is checked too (COPY would read item "ax", unknown: a different reject)
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", head + ok + 'u1,"a"x,click,2024-02-01'))
    assert (failed.value.rejects[0].line, failed.value.rejects[0].field) == (3, "(line)")
    # quotes the csv module writes stay on the SQL path
    r = ingest.import_file(db.conn, "events", _write(
        tmp_path / "ev.csv", head + '"u""1",a,click,2024-02-01T10:00:00Z\n"u,2",b,click,2024-02-01T10:00:00Z\n'))
    assert (r.checked_by, r.stored) == ("sql", 2)
    assert {u for u, *_ in _events(db)} == {'u"1', "u,2"}


def _daily_recount(db: TestDB) -> list[tuple[Any, ...]]:
    """pgrec.item_daily_counts as a recount of pgrec.events (the segment is the users' country)."""
    return db.conn.execute(
        "SELECT e.item_key, (e.occurred_at AT TIME ZONE 'UTC')::date, coalesce(u.properties ->> 'country', ''), "
        "count(*), count(*) FILTER (WHERE e.polarity = 1), count(*) FILTER (WHERE e.polarity = -1), "
        "round(coalesce(sum(e.weight) FILTER (WHERE e.polarity = 1), 0)::numeric, 6) "
        "FROM pgrec.events e LEFT JOIN pgrec.users u USING (user_key) GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").fetchall()


def _daily_stored(db: TestDB) -> list[tuple[Any, ...]]:
    return db.conn.execute(
        "SELECT item_key, day, segment, n_events, n_positive, n_negative, round(w_positive::numeric, 6) "
        "FROM pgrec.item_daily_counts WHERE n_events > 0 ORDER BY 1, 2, 3").fetchall()


def _trending(db: TestDB) -> dict[tuple[str, str, int], float]:
    """The trending sums scaled to one reference time (each horizon stores them scaled to its own epoch)."""
    rows = db.conn.execute(
        "SELECT s.horizon, s.segment, s.item_key, s.score * power(2::float8, "
        "date_part('epoch', e.epoch - timestamptz '2024-02-01') / e.half_life_s) "
        "FROM pgrec.trending_scores s JOIN pgrec.trending_epochs e USING (horizon)").fetchall()
    return {(h, s, k): v for h, s, k, v in rows}


def test_bulk_loads_keep_the_aggregates_a_recount_gives(db: TestDB, tmp_path: Path) -> None:
    """Files of >= 1000 events take the trigger's plain-insert path for daily counters on new keys and its
    upsert when keys exist; either way the counters equal a recount and the trending sums a rebuild."""
    import random

    _setup(db, tmp_path)
    users = "user_id,properties\n" + "".join(
        f'u{n},"{{""country"": ""{c}""}}"\n' if c else f"u{n},\n"
        for n, c in enumerate(["de", "fr", "", "jp"] * 8))
    ingest.import_file(db.conn, "users", _write(tmp_path / "users.csv", users))
    rnd = random.Random(3)

    def events_file(name: str, day0: int) -> Path:
        rows = [f"{name}{n},u{rnd.randrange(32)},{rnd.choice('abc')},{rnd.choice(['click', 'view', 'like', 'rating'])},"
                f"2024-02-{day0 + rnd.randrange(4):02d}T{rnd.randrange(24):02d}:{rnd.randrange(60):02d}:"
                f"{rnd.randrange(60):02d}Z,{rnd.choice(['', '1', '5'])}" for n in range(1500)]
        return _write(tmp_path / f"{name}.csv", "event_id,user_id,item_id,event_type,occurred_at,value\n"
                      + "\n".join(rows) + "\n")

    for name, day0 in (("first", 1), ("again", 3)):  # the second file shares days 3 and 4: stored keys
        stored = ingest.import_file(db.conn, "events", events_file(name, day0)).stored
        assert stored > 1000
        assert _daily_stored(db) == _daily_recount(db)
        kept = _trending(db)
        db.conn.execute("SELECT pgrec.rebuild_trending()")
        rebuilt = _trending(db)
        assert kept.keys() == rebuilt.keys() and len(kept) > 10
        assert all(abs(kept[k] - rebuilt[k]) <= 1e-9 * max(1.0, abs(rebuilt[k])) for k in kept)


def test_single_events_keep_the_aggregates_a_recount_gives(db: TestDB, tmp_path: Path) -> None:
    """pgrec.track_event (one row per statement: the trigger's small-statement path) sums as a recount does."""
    _setup(db, tmp_path)
    ingest.import_file(db.conn, "users", _write(tmp_path / "users.csv",
                                                'user_id,properties\nu1,"{""country"": ""de""}"\nu2,\n'))
    calls = [("u1", "a", "click", "2024-02-01T10:00:00Z", None), ("u1", "a", "click", "2024-02-01T11:00:00Z", None),
             ("u2", "a", "rating", "2024-02-01T12:00:00Z", 1), ("u2", "b", "like", "2024-02-02T10:00:00Z", None),
             ("u1", "b", "rating", "2024-02-03T10:00:00Z", 5), ("u3", "c", "view", "2024-02-03T11:00:00Z", None)]
    for user, item, kind, at, value in calls:
        db.conn.execute("SELECT pgrec.track_event(%s, %s, %s, %s::timestamptz, %s)", (user, item, kind, at, value))
    assert _daily_stored(db) == _daily_recount(db)
    kept = _trending(db)
    db.conn.execute("SELECT pgrec.rebuild_trending()")
    rebuilt = _trending(db)
    assert kept.keys() == rebuilt.keys() and ("trending", "de", db.scalar(
        "SELECT item_key FROM pgrec.items WHERE item_id = 'a'")) in kept
    assert all(abs(kept[k] - rebuilt[k]) <= 1e-9 * max(1.0, abs(rebuilt[k])) for k in kept)
