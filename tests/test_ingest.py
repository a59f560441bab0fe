"""Getting data in: SQL functions, bulk imports (good, bad, duplicate input), embeddings."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import psycopg
import pytest
from conftest import TEST_DIM, TestDB
from typer.testing import CliRunner

from engine import ingest
from engine.cli import app
from engine.config import get_settings


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


ITEMS_CSV = """item_id,categories,created_at,properties
a,news|sports,2024-01-01T00:00:00Z,"{""title"": ""A""}"
b,news,2024-01-02,
c,,,
"""

EVENTS_CSV = """event_id,user_id,item_id,event_type,occurred_at,value
e1,u1,a,click,2024-02-01T10:00:00Z,
e2,u1,b,rating,2024-02-01T11:00:00Z,5
e3,u2,a,rating,2024-02-02T11:00:00Z,1
,u2,b,view,2024-03-05T11:00:00+02:00,
"""


def _items(db: TestDB, tmp_path: Path) -> None:
    ingest.import_file(db.conn, "items", _write(tmp_path / "items.csv", ITEMS_CSV))


# ---------------------------------------------------------------- SQL functions


def test_track_event_creates_user_and_rejects_unknown_item(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a')")
    assert db.scalar("SELECT pgrec.track_event('new-user', 'a', 'view')") == "stored"
    assert db.scalar("SELECT count(*) FROM pgrec.users WHERE user_id = 'new-user'") == 1
    with pytest.raises(psycopg.errors.NoDataFound, match='unknown item "zzz"'):
        db.conn.execute("SELECT pgrec.track_event('new-user', 'zzz', 'view')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match='unknown event type "poke"'):
        db.conn.execute("SELECT pgrec.track_event('new-user', 'a', 'poke')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="in the future"):
        db.conn.execute("SELECT pgrec.track_event('new-user', 'a', 'view', now() + interval '3 days')")
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 1


def test_track_event_polarity_follows_rating_thresholds(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item(i) FROM unnest(ARRAY['a','b','c','d']) i")
    for item, value in (("a", 5), ("b", 3), ("c", 1)):
        db.conn.execute("SELECT pgrec.track_event('u', %s, 'rating', value => %s)", (item, value))
    db.conn.execute("SELECT pgrec.track_event('u', 'd', 'dislike')")
    rows = db.conn.execute(
        "SELECT i.item_id, e.polarity FROM pgrec.events e JOIN pgrec.items i USING (item_key) ORDER BY 1"
    ).fetchall()
    assert rows == [("a", 1), ("b", 0), ("c", -1), ("d", -1)]


def test_track_event_idempotent_under_concurrency(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a')")
    results: list[str] = []
    barrier = threading.Barrier(2)

    def worker() -> None:
        with db.connect(autocommit=False) as conn:
            barrier.wait()
            for n in range(50):
                row = conn.execute("SELECT pgrec.track_event('u1', 'a', 'click', now() - %s * interval '1 s', "
                                   "NULL, %s)", (n, f"ev-{n}")).fetchone()
                assert row is not None
                results.append(row[0])
                conn.commit()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count("stored") == 50
    assert sorted(results).count("duplicate") == 50
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 50


def test_upsert_item_updates_only_given_fields(db: TestDB) -> None:
    k = db.scalar("SELECT pgrec.upsert_item('a', ARRAY['x'], '{\"t\": 1}')")
    assert db.scalar("SELECT pgrec.upsert_item('a', available => false)") == k
    row = db.conn.execute("SELECT categories, properties, available FROM pgrec.items WHERE item_id='a'").fetchone()
    assert row == (["x"], {"t": 1}, False)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="properties must be a JSON object"):
        db.conn.execute("SELECT pgrec.upsert_item('a', properties => '[1]')")


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        ("ARRAY[1,2,3]::float8[]", "has 3 dimensions, expected 16"),
        (f"array_fill(1.0::float8, ARRAY[{TEST_DIM - 1}]) || 'NaN'::float8", "NaN or infinite value at position 16"),
        (f"array_fill(1.0::float8, ARRAY[{TEST_DIM - 1}]) || 'Infinity'::float8", "infinite value at position 16"),
        (f"array_fill(0.0::float8, ARRAY[{TEST_DIM}])", "all zeros"),
    ],
)
def test_bad_vectors_name_the_item(db: TestDB, vector: str, message: str) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('film-7')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message) as err:
        db.conn.execute(f"SELECT pgrec.set_item_embedding('film-7', {vector})")
    assert '"film-7"' in str(err.value)
    assert db.scalar("SELECT count(*) FROM pgrec.item_embeddings") == 0


def test_good_vector_and_unknown_ids(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a')")
    db.conn.execute(f"SELECT pgrec.set_item_embedding('a', array_fill(0.5::float8, ARRAY[{TEST_DIM}]))")
    assert db.scalar("SELECT count(*) FROM pgrec.item_embeddings") == 1
    with pytest.raises(psycopg.errors.NoDataFound, match='unknown item "nope"'):
        db.conn.execute(f"SELECT pgrec.set_item_embedding('nope', array_fill(0.5::float8, ARRAY[{TEST_DIM}]))")
    with pytest.raises(psycopg.errors.NoDataFound, match='unknown user "nobody"'):
        db.conn.execute(f"SELECT pgrec.set_user_embedding('nobody', array_fill(0.5::float8, ARRAY[{TEST_DIM}]))")


# ---------------------------------------------------------------- bulk imports


def test_import_items_users_events_csv_and_jsonl(db: TestDB, tmp_path: Path) -> None:
    _items(db, tmp_path)
    users = _write(tmp_path / "users.jsonl", '{"user_id": "u1", "properties": {"country": "de"}}\n{"user_id": "u2"}\n')
    r = ingest.import_file(db.conn, "users", users)
    assert (r.read, r.stored) == (2, 2)
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "events.csv", EVENTS_CSV))
    assert (r.read, r.stored, r.duplicates) == (4, 4, 0)
    assert db.scalar("SELECT categories FROM pgrec.items WHERE item_id = 'a'") == ["news", "sports"]
    assert db.scalar("SELECT properties->>'country' FROM pgrec.users WHERE user_id = 'u1'") == "de"
    assert db.scalar("SELECT polarity FROM pgrec.events e JOIN pgrec.items i USING (item_key) "
                     "JOIN pgrec.users u USING (user_key) WHERE u.user_id='u2' AND i.item_id='a'") == -1
    # the +02:00 offset is honoured
    assert db.scalar("SELECT to_char(max(occurred_at) AT TIME ZONE 'UTC', 'HH24') FROM pgrec.events") == "09"
    jsonl = _write(tmp_path / "more.jsonl", json.dumps(
        {"user_id": "u3", "item_id": "c", "event_type": "like", "occurred_at": "2024-04-01T00:00:00Z",
         "properties": {"device": "tv"}}) + "\n")
    assert ingest.import_file(db.conn, "events", jsonl).stored == 1
    # partitions were made for every month touched
    assert db.scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'pgrec.events'::regclass") == 3


def test_import_same_events_twice_is_idempotent(db: TestDB, tmp_path: Path) -> None:
    _items(db, tmp_path)
    path = _write(tmp_path / "events.csv", EVENTS_CSV)
    ingest.import_file(db.conn, "events", path)
    again = ingest.import_file(db.conn, "events", path)
    assert (again.stored, again.duplicates) == (0, 4)
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 4
    assert db.scalar("SELECT count(*) FROM pgrec.event_ids") == 3


def test_bad_row_imports_nothing_and_names_line_and_field(db: TestDB, tmp_path: Path) -> None:
    _items(db, tmp_path)
    bad = EVENTS_CSV + "e9,u9,a,click,not-a-time,\n"
    with pytest.raises(ingest.ImportFailed, match=r"line 6, field occurred_at: not an ISO 8601 time"):
        ingest.import_file(db.conn, "events", _write(tmp_path / "bad.csv", bad))
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 0
    assert db.scalar("SELECT count(*) FROM pgrec.users") == 0


def test_unknown_item_rejected_unless_create_missing(db: TestDB, tmp_path: Path) -> None:
    _items(db, tmp_path)
    text = EVENTS_CSV + "e9,u9,ghost,click,2024-02-03T00:00:00Z,\n"
    path = _write(tmp_path / "ev.csv", text)
    with pytest.raises(ingest.ImportFailed, match=r"line 6, field item_id: unknown item 'ghost'"):
        ingest.import_file(db.conn, "events", path)
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 0
    r = ingest.import_file(db.conn, "events", path, create_missing_items=True)
    assert r.stored == 5
    assert db.scalar("SELECT count(*) FROM pgrec.items WHERE item_id = 'ghost'") == 1


def test_skip_invalid_writes_rejects(db: TestDB, tmp_path: Path) -> None:
    _items(db, tmp_path)
    text = EVENTS_CSV + "e8,u9,a,poke,2024-02-03T00:00:00Z,\ne9,u9,a,click,2024-02-03T00:00:00Z,abc\n"
    rejects = tmp_path / "rejects.jsonl"
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", text), skip_invalid=True,
                           rejects_path=rejects)
    assert r.stored == 4
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert {(x["line"], x["field"]) for x in lines} == {(6, "event_type"), (7, "value")}


def test_bad_items_and_users(db: TestDB, tmp_path: Path) -> None:
    with pytest.raises(ingest.ImportFailed, match=r"line 2, field properties: not valid JSON"):
        ingest.import_file(db.conn, "items", _write(tmp_path / "i.csv", "item_id,properties\nx,{oops\n"))
    with pytest.raises(ingest.ImportFailed, match=r"line 1, field user_id: is required"):
        ingest.import_file(db.conn, "users", _write(tmp_path / "u.jsonl", '{"properties": {}}\n'))
    with pytest.raises(ingest.ImportFailed, match=r"line 2, field \(line\): not valid JSON"):
        ingest.import_file(db.conn, "users", _write(tmp_path / "u2.jsonl", '{"user_id": "a"}\n{broken\n'))
    assert db.scalar("SELECT count(*) FROM pgrec.items") + db.scalar("SELECT count(*) FROM pgrec.users") == 0


def test_import_embeddings_formats_and_errors(db: TestDB, tmp_path: Path) -> None:
    _items(db, tmp_path)
    vec = np.arange(1, TEST_DIM + 1, dtype=np.float32)
    csv_path = _write(tmp_path / "v.csv", "a," + ",".join(str(x) for x in vec) + "\n")
    assert ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(csv_path)) == 1
    jl = _write(tmp_path / "v.jsonl", json.dumps({"id": "b", "vector": (vec * 2).tolist()}) + "\n")
    assert ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(jl)) == 1
    np.save(tmp_path / "v.npy", np.stack([vec, vec]))
    (tmp_path / "v.ids.txt").write_text("a\nc\n")
    assert ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(tmp_path / "v.npy")) == 2
    assert db.scalar("SELECT count(*) FROM pgrec.item_embeddings") == 3
    bad = np.stack([vec, vec])
    bad[1, 3] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    (tmp_path / "bad.ids.txt").write_text("a\nb\n")
    with pytest.raises(ingest.ImportFailed, match='item "b" has a NULL, NaN or infinite value at position 4'):
        ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(tmp_path / "bad.npy"))
    unknown = _write(tmp_path / "u.csv", "zz," + ",".join("1" for _ in range(TEST_DIM)) + "\n")
    with pytest.raises(ingest.ImportFailed, match="unknown item 'zz'"):
        ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(unknown))
    # nothing of the failed files was stored: b still has its JSONL vector
    assert db.scalar("SELECT (embedding::real[])[1] FROM pgrec.item_embeddings e JOIN pgrec.items USING (item_key) "
                     "WHERE item_id='b'") == 2.0


# ---------------------------------------------------------------- CLI


def test_cli_import_reports_bad_row_and_exits_nonzero(db: TestDB, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(TEST_DIM))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        ok = runner.invoke(app, ["import", "items", str(_write(tmp_path / "items.csv", ITEMS_CSV))])
        assert ok.exit_code == 0, ok.output
        bad = _write(tmp_path / "bad.csv", "user_id,item_id,event_type,occurred_at\nu1,a,click,yesterday\n")
        res = runner.invoke(app, ["import", "events", str(bad)])
        assert res.exit_code == 1
        assert "line 2, field occurred_at" in res.output
        ok = runner.invoke(app, ["import", "events", str(_write(
            tmp_path / "ev.csv", "user_id,item_id,event_type,occurred_at\nu1,a,click,2024-01-01\n"
                                 "u1,a,view,2024-01-02\nu2,b,click,2024-01-01\n"))])
        assert ok.exit_code == 0, ok.output
        res = runner.invoke(app, ["stats", "--json"])
        assert res.exit_code == 0 and '"items": 3' in res.output
        got = json.loads(res.output)
        # two of the 2 x 3 (user, item) pairs have events; u1's two events on a count once
        assert (got["events"], got["user_item_pairs"], got["density"]) == (3, 2, pytest.approx(2 / 6))
    finally:
        get_settings.cache_clear()


# ---------------------------------------------------------------- input that v1 mishandled (session 8 review)


def test_item_and_user_imports_keep_what_the_file_leaves_out(db: TestDB, tmp_path: Path) -> None:
    _items(db, tmp_path)
    before = db.conn.execute("SELECT item_id, categories, properties, created_at FROM pgrec.items "
                             "ORDER BY item_id").fetchall()
    only = _write(tmp_path / "avail.csv", "item_id,available\na,false\nb,\nc,true\n")
    for _ in range(2):  # twice: the same rows
        ingest.import_file(db.conn, "items", only)
        after = db.conn.execute("SELECT item_id, categories, properties, created_at FROM pgrec.items "
                                "ORDER BY item_id").fetchall()
        assert after == before  # categories, properties and created_at kept (v1 reset created_at to now)
    assert db.conn.execute("SELECT item_id, available FROM pgrec.items ORDER BY item_id").fetchall() == [
        ("a", False), ("b", True), ("c", True)]
    ingest.import_file(db.conn, "users", _write(tmp_path / "u.jsonl", '{"user_id": "x", "properties": {"k": 1}}\n'))
    ingest.import_file(db.conn, "users", _write(tmp_path / "u.csv", "user_id\nx\ny\n"))
    assert db.conn.execute("SELECT user_id, properties FROM pgrec.users ORDER BY user_id").fetchall() == [
        ("x", {"k": 1}), ("y", {})]


def test_an_unterminated_quote_imports_nothing_even_when_skipping(db: TestDB, tmp_path: Path) -> None:
    path = _write(tmp_path / "i.csv", 'item_id,categories\nu0,x\nu1,"unterminated\nu2,ok\nu3,ok\n')
    for skip in (False, True):
        with pytest.raises(ingest.ImportFailed, match=r"line 3, field .line.: a quoted field that starts on this "
                                                      "line is not closed"):
            ingest.import_file(db.conn, "items", path, skip_invalid=skip)
    assert db.scalar("SELECT count(*) FROM pgrec.items") == 0
    # a quote inside a field is one bad row: --skip-invalid keeps the others
    bad = _write(tmp_path / "j.csv", 'item_id,categories\nu0,x\nu1,"a"b\nu2,ok\n')
    r = ingest.import_file(db.conn, "items", bad, skip_invalid=True)
    assert r.stored == 2 and [(x.line, x.field) for x in r.rejected] == [(3, "(line)")]


def test_long_csv_fields_and_a_fresh_rejects_file(db: TestDB, tmp_path: Path) -> None:
    long_title = "t" * 300_000  # beyond the csv module's default field limit of 128 KiB
    path = _write(tmp_path / "i.csv", f'item_id,properties\nbig,"{{""title"": ""{long_title}""}}"\n')
    assert ingest.import_file(db.conn, "items", path).stored == 1
    assert db.scalar("SELECT length(properties ->> 'title') FROM pgrec.items WHERE item_id = 'big'") == 300_000
    rejects = tmp_path / "r.jsonl"
    events = _write(tmp_path / "ev.csv", EVENTS_CSV.replace(",u1,a,", ",u1,big,").replace(",u2,a,", ",u2,big,")
                    .replace(",u1,b,", ",u1,big,").replace(",u2,b,", ",u2,big,") + "e8,u9,big,poke,2024-02-03,\n")
    ingest.import_file(db.conn, "events", events, skip_invalid=True, rejects_path=rejects)
    assert len(rejects.read_text().splitlines()) == 1
    events.write_text(EVENTS_CSV.replace(",a,", ",big,").replace(",b,", ",big,"))  # fixed
    ingest.import_file(db.conn, "events", events, skip_invalid=True, rejects_path=rejects)
    assert rejects.read_text() == ""  # not the stale rejects of the earlier run


def test_events_before_1970_are_refused_on_every_path(db: TestDB, tmp_path: Path) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a')")
    for when in ("1969-12-31T23:59:59Z", "-infinity"):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="is before 1970-01-01"):
            db.conn.execute("SELECT pgrec.track_event('u', 'a', 'click', %s::timestamptz)", (when,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="value is Infinity"):
        db.conn.execute("SELECT pgrec.track_event('u', 'a', 'rating', value => 'Infinity')")
    for jsonl in (False, True):  # the Python check (JSONL) and the SQL check pass (CSV, PostgreSQL >= 16)
        path = (_write(tmp_path / "e.jsonl", '{"user_id": "u", "item_id": "a", "event_type": "click", '
                                             '"occurred_at": "1969-07-20T20:17:00Z"}\n') if jsonl else
                _write(tmp_path / "e.csv", "user_id,item_id,event_type,occurred_at\nu,a,click,1969-07-20T20:17:00Z\n"))
        with pytest.raises(ingest.ImportFailed, match=r"line [12], field occurred_at: .* is before 1970-01-01"):
            ingest.import_file(db.conn, "events", path)
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 0
    assert db.scalar("SELECT count(*) FROM pg_class WHERE relname LIKE 'events_19%'") == 0


def test_ids_are_checked_with_a_clear_message(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a')")
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=r"pgrec.upsert_item: item_id is longer than 256 characters"):
        db.conn.execute("SELECT pgrec.upsert_item(repeat('x', 300))")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"pgrec.track_event: event_id is required"):
        db.conn.execute("SELECT pgrec.track_event('u', 'a', 'click', event_id => '')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"pgrec.upsert_user: user_id is longer"):
        db.conn.execute("SELECT pgrec.upsert_user(repeat('y', 257))")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="created_at must be a finite time"):
        db.conn.execute("SELECT pgrec.upsert_item('b', created_at => 'infinity')")


def test_vector_values_beyond_and_below_a_real(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a')")
    huge = f"array_fill(0.1::float8, ARRAY[{TEST_DIM - 1}]) || 1e39::float8"
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=f'item "a" has a value beyond the range of a 4-byte float .* at position {TEST_DIM}'):
        db.conn.execute(f"SELECT pgrec.set_item_embedding('a', {huge})")
    largest = f"array_fill(0.1::float8, ARRAY[{TEST_DIM - 1}]) || 3.4028235e38::float8"  # how real prints its max
    db.conn.execute(f"SELECT pgrec.set_item_embedding('a', {largest})")
    tiny = f"array_fill(0.1::float8, ARRAY[{TEST_DIM - 1}]) || 1e-46::float8"
    db.conn.execute(f"SELECT pgrec.set_item_embedding('a', {tiny})")  # v1: "value out of range: underflow"
    v = db.scalar("SELECT embedding::real[] FROM pgrec.item_embeddings")
    assert v[-1] == 0.0 and v[0] == pytest.approx(0.1)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="all zeros"):
        db.conn.execute(f"SELECT pgrec.set_item_embedding('a', array_fill(1e-300::float8, ARRAY[{TEST_DIM}]))")



def test_an_id_repeated_in_a_file_merges_field_by_field(db: TestDB, tmp_path: Path) -> None:
    """As upsert_item applied line by line: each field keeps the last value the file gives it."""
    path = _write(tmp_path / "dup.csv", 'item_id,categories,properties\nn1,cat1,\nn1,,"{""k"": 1}"\nn2,x,\n')
    r = ingest.import_file(db.conn, "items", path)
    assert (r.stored, r.duplicates) == (2, 1)
    assert db.conn.execute("SELECT categories, properties FROM pgrec.items WHERE item_id = 'n1'").fetchone() == (
        ["cat1"], {"k": 1})


def test_an_import_waits_for_a_session_creating_the_same_user(db: TestDB, tmp_path: Path) -> None:
    """A user created by track_event while an import of that user runs: the import waits and then updates it
    (a MERGE failed the whole import with a unique violation)."""
    path = _write(tmp_path / "u.jsonl", '{"user_id": "race1", "properties": {"from": "file"}}\n')
    other = db.connect()
    errors: list[BaseException] = []
    try:
        other.execute("BEGIN")
        other.execute("SELECT pgrec.upsert_user('race1', '{\"from\": \"app\"}')")

        def run() -> None:
            try:
                ingest.import_file(db.conn, "users", path)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # waiting on the other session's row
        other.execute("COMMIT")
        t.join(30)
        assert not errors, errors
    finally:
        other.close()
    assert db.scalar("SELECT properties FROM pgrec.users WHERE user_id = 'race1'") == {"from": "file"}
