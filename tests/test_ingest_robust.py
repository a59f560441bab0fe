"""Bad input to the bulk imports: every refusal names the line and the field, loses nothing, and shows no traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_DIM, TestDB
from typer.testing import CliRunner

from engine import ingest
from engine.cli import app
from engine.config import get_settings

HEADER = "user_id,item_id,event_type,occurred_at\n"
T = "2024-02-01T10:00:00Z"


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _setup(db: TestDB, tmp_path: Path) -> None:
    ingest.import_file(db.conn, "items", _write(tmp_path / "items.csv", "item_id\na\nb\nc\n"))


def _count(db: TestDB, table: str) -> int:
    return int(db.scalar(f"SELECT count(*) FROM pgrec.{table}"))


@pytest.fixture(params=["sql", "python"])
def path_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Events files through the fast (SQL) path and through the Python reader: the same outcome."""
    if request.param == "python":
        monkeypatch.setattr(ingest, "_fast_path_applies", lambda conn, path: False)
    return str(request.param)


@pytest.fixture
def cli(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(TEST_DIM))
    get_settings.cache_clear()
    try:
        yield CliRunner()
    finally:
        get_settings.cache_clear()


# ---------------------------------------------------------------- 1. the rejects file is checked first


MIX = HEADER + f"u1,a,click,{T}\nu1,a,poke,{T}\nu1,b,click,bad\n"


@pytest.mark.parametrize("where", ["missing/dir/r.jsonl", ".", "mix.csv"])
def test_unwritable_rejects_path_fails_before_importing(db: TestDB, tmp_path: Path, where: str) -> None:
    _setup(db, tmp_path)
    path = _write(tmp_path / "mix.csv", MIX)
    with pytest.raises(ValueError, match=r"rejects file .*(does not exist|is a directory|is the file being imported)"):
        ingest.import_file(db.conn, "events", path, skip_invalid=True, rejects_path=tmp_path / where)
    assert _count(db, "events") == 0
    assert path.read_text() == MIX


def test_rejects_file_failing_to_write_undoes_the_import(db: TestDB, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _setup(db, tmp_path)

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest, "write_rejects", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ingest.import_file(db.conn, "events", _write(tmp_path / "mix.csv", MIX), skip_invalid=True)
    assert _count(db, "events") + _count(db, "users") == 0


def test_cli_rejects_path_errors_are_clear(db: TestDB, tmp_path: Path, cli: CliRunner) -> None:
    _setup(db, tmp_path)
    path = _write(tmp_path / "mix.csv", MIX)
    for where, says in ((tmp_path / "nope" / "r.jsonl", "does not exist"), (tmp_path, "is a directory")):
        res = cli.invoke(app, ["import", "events", str(path), "--skip-invalid", "--rejects", str(where)])
        assert res.exit_code == 1, res.output
        assert says in " ".join(res.output.split()) and "Traceback" not in res.output
        assert isinstance(res.exception, SystemExit)
    assert _count(db, "events") == 0
    res = cli.invoke(app, ["import", "events", str(path), "--skip-invalid", "--rejects", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    assert _count(db, "events") == 1 and (tmp_path / "r.jsonl").read_text().count("\n") == 2


# ---------------------------------------------------------------- 2. ids are strings (or integers)


def _event(**kw: object) -> str:
    return json.dumps({"user_id": "u1", "item_id": "a", "event_type": "click", "occurred_at": T, **kw})


def test_json_ids_must_be_strings_or_integers(db: TestDB, tmp_path: Path, path_kind: str) -> None:
    _setup(db, tmp_path)
    lines = [
        _event(event_id=["e"], user_id=False),          # 1
        _event(user_id=7),                             # 2: an integer is its decimal text
        _event(item_id={"a": 1}),                      # 3
        _event(user_id="U").replace('"U"', "1e400"),  # 4
        _event(user_id=1.5),                           # 5
        _event(user_id="U").replace('"U"', "1e2"),      # 6: 100, as PostgreSQL reads it
        _event(event_type=True),                       # 7
        _event(user_id="12", event_id="e8"),           # 8: a string that looks like a number is fine
    ]
    path = _write(tmp_path / "ev.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "events", path)
    got = [(r.line, r.field) for r in failed.value.rejects]
    assert got == [(1, "event_id"), (3, "item_id"), (4, "user_id"), (5, "user_id"), (7, "event_type")]
    assert failed.value.rejects[0].reason == "must be a string, not a JSON array"
    assert "not a JSON object" in failed.value.rejects[1].reason
    assert _count(db, "events") + _count(db, "users") == 0
    r = ingest.import_file(db.conn, "events", path, skip_invalid=True)
    assert (r.checked_by, r.stored, len(r.rejected)) == (path_kind, 3, 5)
    assert "longer than 256" in r.rejected[2].reason and r.rejected[3].reason.endswith("not 1.5")
    assert sorted(x[0] for x in db.conn.execute("SELECT user_id FROM pgrec.users").fetchall()) == ["100", "12", "7"]
    assert db.scalar("SELECT count(*) FROM pgrec.event_ids WHERE event_id LIKE '[%%'") == 0


def test_item_and_user_ids_must_be_strings(db: TestDB, tmp_path: Path) -> None:
    path = _write(tmp_path / "i.jsonl", '{"item_id":{"a":1}}\n{"item_id":1e400}\n{"item_id":8}\n'
                                        '{"item_id":"x","categories":["ok",{"b":2}]}\n')
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "items", path)
    assert [(r.line, r.field) for r in failed.value.rejects] == [(1, "item_id"), (2, "item_id"), (4, "categories")]
    assert _count(db, "items") == 0
    with pytest.raises(ingest.ImportFailed, match=r"line 1, field user_id: must be a string, not false"):
        ingest.import_file(db.conn, "users", _write(tmp_path / "u.jsonl", '{"user_id": false}\n'))
    assert ingest.import_file(db.conn, "items", path, skip_invalid=True).stored == 1
    assert db.scalar("SELECT string_agg(item_id, ',') FROM pgrec.items") == "8"


def test_utc_offsets_postgresql_lacks_are_rejects_on_every_path(db: TestDB, tmp_path: Path, path_kind: str) -> None:
    """PostgreSQL takes UTC offsets up to 15:59, Python up to 23:59: an item's created_at of +16:22 reached the
    database and failed without a line; now both paths name it, as the events' SQL check does."""
    items = _write(tmp_path / "i.csv", "item_id,created_at\nok,2020-01-01T00:00:00+15:59\nfar,2020-01-01T00:00:00+16:22\n")
    with pytest.raises(ingest.ImportFailed, match=r"line 3, field created_at: not an ISO 8601 time"):
        ingest.import_file(db.conn, "items", items)
    assert _count(db, "items") == 0
    _setup(db, tmp_path)
    events = _write(tmp_path / "e.csv", "user_id,item_id,event_type,occurred_at\n"
                                        "u,a,view,2020-01-01T00:00:00-16:00\nu,b,view,2020-01-01T00:00:00-15:00\n")
    with pytest.raises(ingest.ImportFailed, match=r"line 2, field occurred_at: not an ISO 8601 time"):
        ingest.import_file(db.conn, "events", events)
    assert _count(db, "events") == 0


# ---------------------------------------------------------------- 3. bytes and values PostgreSQL cannot store


def test_bad_bytes_and_nul_in_csv_are_rejects(db: TestDB, tmp_path: Path, path_kind: str) -> None:
    _setup(db, tmp_path)
    data = (HEADER + f"u1,a,click,{T}\nu\xe9,a,click,{T}\n").encode("latin-1") + \
        f"u2,b,cl\x00ick,{T}\nu3,c,view,{T}\n".encode()
    path = _write(tmp_path / "enc.csv", data)
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "events", path)
    assert [(r.line, r.field) for r in failed.value.rejects] == [(3, "user_id"), (4, "event_type")]
    assert failed.value.rejects[0].reason == "is not valid UTF-8 (byte 0xe9)"
    assert "NUL" in failed.value.rejects[1].reason
    assert _count(db, "events") == 0
    r = ingest.import_file(db.conn, "events", path, skip_invalid=True)
    assert (r.stored, len(r.rejected)) == (2, 2)


def test_nan_nul_and_surrogates_in_jsonl_are_rejects(db: TestDB, tmp_path: Path, path_kind: str) -> None:
    _setup(db, tmp_path)
    lines = [
        _event(),
        _event()[:-1] + ', "properties": {"price": NaN}}',
        _event()[:-1] + ', "properties": {"s": "\\u0000"}}',
        _event()[:-1] + ', "properties": {"s": "\\ud800"}}',
        _event(user_id="u9", properties={"s": "\U0001f600 ok"}),  # a surrogate pair is a character
        _event()[:-1] + ', "value": Infinity}',
    ]
    path = _write(tmp_path / "ev.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_file(db.conn, "events", path)
    rejects = failed.value.rejects
    assert [(r.line, r.field) for r in rejects] == [(2, "properties"), (3, "properties"), (4, "properties"),
                                                    (6, "value")]
    assert "NaN or Infinity" in rejects[0].reason and "NUL" in rejects[1].reason and "surrogate" in rejects[2].reason
    r = ingest.import_file(db.conn, "events", path, skip_invalid=True)
    assert (r.stored, len(r.rejected)) == (2, 4)
    assert db.scalar("SELECT properties->>'s' FROM pgrec.events WHERE properties ? 's'") == "\U0001f600 ok"


def test_items_properties_nan_and_nul(db: TestDB, tmp_path: Path) -> None:
    jl = _write(tmp_path / "i.jsonl", '{"item_id":"n1","properties":{"price":NaN}}\n'
                                      '{"item_id":"n2","properties":{"s":"\\u0000"}}\n{"item_id":"n3"}\n')
    with pytest.raises(ingest.ImportFailed, match=r"line 1, field properties: holds NaN .*; line 2, field properties"):
        ingest.import_file(db.conn, "items", jl)
    cs = _write(tmp_path / "i.csv", b'item_id,properties\nx1,"{""a"":""\xe9""}"\nx2,"{""a"":""\\u0000""}"\nx3,\n')
    with pytest.raises(ingest.ImportFailed, match=r"line 2, field properties: is not valid UTF-8 .*; line 3, field "
                                                  r"properties: holds a NUL"):
        ingest.import_file(db.conn, "items", cs)
    assert _count(db, "items") == 0
    assert ingest.import_file(db.conn, "items", cs, skip_invalid=True).stored == 1


# ---------------------------------------------------------------- 4. embeddings name the line


def test_refused_vectors_name_their_line(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    ones = ",".join("1" for _ in range(TEST_DIM))
    text = (f"a,{ones}\n"
            f"b,{','.join(['1'] * (TEST_DIM - 1) + ['nan'])}\n"
            f"c,{','.join('0' for _ in range(TEST_DIM))}\n"
            "a,1,2,3\n")
    with pytest.raises(ingest.ImportFailed) as failed:
        ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(_write(tmp_path / "v.csv", text)))
    got = [(r.line, r.reason) for r in failed.value.rejects]
    assert [line for line, _ in got] == [2, 3, 4]
    assert 'item "b" has a NULL, NaN or infinite value' in got[0][1]
    assert got[1][1] == 'embedding for item "c" is all zeros (cosine distance is undefined)'
    assert f"has 3 dimensions, expected {TEST_DIM}" in got[2][1]
    assert _count(db, "item_embeddings") == 0


def test_embedding_jsonl_bad_lines_named(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    vec = np.ones(TEST_DIM).tolist()
    for text, line, field in [
        (json.dumps({"id": "a", "vector": vec}) + "\n{broken\n", 2, "(line)"),
        (json.dumps({"id": "a", "vector": vec}) + "\n[1]\n", 2, "(line)"),
        (json.dumps({"vector": vec}) + "\n", 1, "id"),
        (json.dumps({"id": ["a"], "vector": vec}) + "\n", 1, "id"),
        (json.dumps({"id": "a", "vector": [*vec[:-1], "x"]}) + "\n", 1, "vector"),
        (json.dumps({"id": "a", "vector": vec}) + "\n" + json.dumps({"id": "b", "vector": vec})[:-2] + ", NaN]}\n",
         2, "vector"),
    ]:
        with pytest.raises(ingest.ImportFailed) as failed:
            ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(_write(tmp_path / "v.jsonl", text)))
        assert (failed.value.rejects[0].line, failed.value.rejects[0].field) == (line, field), text
    assert _count(db, "item_embeddings") == 0


# ---------------------------------------------------------------- 5. the rejects file


def test_rejects_file_in_line_order_with_the_rows(db: TestDB, tmp_path: Path, path_kind: str) -> None:
    _setup(db, tmp_path)
    # line 4 fails the field checks, lines 3 and 5 the reference check (which runs later)
    text = HEADER + f"u1,a,click,{T}\nu1,a,poke,{T}\nu1,b,click,never\nu1,ghost,click,{T}\nu2,c,view,{T}\n"
    path = _write(tmp_path / "ev.csv", text)
    r = ingest.import_file(db.conn, "events", path, skip_invalid=True, rejects_path=tmp_path / "r.jsonl")
    assert (r.checked_by, r.stored) == (path_kind, 2)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(x["line"], x["field"]) for x in rows] == [(3, "event_type"), (4, "occurred_at"), (5, "item_id")]
    assert [x["row"] for x in rows] == [f"u1,a,poke,{T}", "u1,b,click,never", f"u1,ghost,click,{T}"]
    # fixed and imported again: the header plus the rows
    fixed = HEADER + "\n".join(x["row"].replace("poke", "like").replace("never", T).replace("ghost", "c")
                               for x in rows) + "\n"
    assert ingest.import_file(db.conn, "events", _write(tmp_path / "fixed.csv", fixed)).stored == 3


def test_rejects_rows_of_multiline_csv_records_and_jsonl(db: TestDB, tmp_path: Path) -> None:
    _setup(db, tmp_path)
    text = ("user_id,item_id,event_type,occurred_at,properties\n"
            f'u1,a,click,{T},"{{\n""k"": 1}}"\n'
            'u1,a,click,bad,"{\n}"\n'
            f"u1,b,click,{T},\n")
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "ml.csv", text), skip_invalid=True,
                           rejects_path=tmp_path / "r.jsonl")
    assert (r.checked_by, r.stored) == ("python", 2)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows == [{"line": 5, "field": "occurred_at", "reason": "not an ISO 8601 time or unix seconds ('bad')",
                     "row": 'u1,a,click,bad,"{\n}"'}]
    jl = _write(tmp_path / "ev.jsonl", _event(event_type="poke") + "\n\n" + _event(occurred_at="x") + "\n")
    ingest.import_file(db.conn, "events", jl, skip_invalid=True)
    rows = [json.loads(x) for x in (tmp_path / "ev.jsonl.rejects.jsonl").read_text().splitlines()]
    assert [(x["line"], x["row"]) for x in rows] == [(1, _event(event_type="poke")), (3, _event(occurred_at="x"))]


# ---------------------------------------------------------------- 6. the header and empty files


def test_missing_required_column_is_one_header_error(db: TestDB, tmp_path: Path, path_kind: str) -> None:
    _setup(db, tmp_path)
    text = f"user_id,item_id,event_type,timestamp\nu1,a,click,{T}\nu2,a,click,{T}\n"
    path = _write(tmp_path / "ev.csv", text)
    for skip in (False, True):
        with pytest.raises(ingest.ImportFailed) as failed:
            ingest.import_file(db.conn, "events", path, skip_invalid=skip)
        assert [(r.line, r.field) for r in failed.value.rejects] == [(1, "(header)")]
        assert "missing the required column occurred_at" in str(failed.value)
        assert "does not read: timestamp" in str(failed.value)
    assert _count(db, "events") + _count(db, "users") == 0
    with pytest.raises(ingest.ImportFailed, match=r"line 1, field \(header\): missing the required column item_id"):
        ingest.import_file(db.conn, "items", _write(tmp_path / "i.csv", "id,name\nx,y\n"), skip_invalid=True)


def test_unknown_columns_warn_and_bom_is_read(db: TestDB, tmp_path: Path, path_kind: str) -> None:
    _setup(db, tmp_path)
    text = "\ufeffuser_id,item_id,event_type,occurred_at,note\n" + f"u1,a,click,{T},hi\n"
    r = ingest.import_file(db.conn, "events", _write(tmp_path / "ev.csv", text, ))
    assert r.stored == 1
    assert len(r.warnings) == 1 and "pgrec does not read: note" in r.warnings[0]
    jl = _write(tmp_path / "ev.jsonl", "\ufeff" + _event(item_id="b") + "\n")
    assert ingest.import_file(db.conn, "events", jl).stored == 1


@pytest.mark.parametrize(("name", "kind"), [("e.csv", "events"), ("e.jsonl", "events"), ("i.csv", "items"),
                                            ("u.jsonl", "users")])
def test_empty_file_is_an_error(db: TestDB, tmp_path: Path, name: str, kind: str) -> None:
    with pytest.raises(ValueError, match="the file is empty"):
        ingest.import_file(db.conn, kind, _write(tmp_path / name, ""))
    with pytest.raises(ValueError, match="the file is empty"):
        ingest.import_file(db.conn, kind, _write(tmp_path / name, "\n \n"), skip_invalid=True)
    # a header and no rows is a file of nothing to do
    if name.endswith(".csv"):
        header = HEADER if kind == "events" else "item_id\n"
        assert ingest.import_file(db.conn, kind, _write(tmp_path / name, header)).read == 0


def test_cli_header_and_empty_file_messages(db: TestDB, tmp_path: Path, cli: CliRunner) -> None:
    _setup(db, tmp_path)
    hdr = _write(tmp_path / "h.csv", f"user_id,item_id,event_type,timestamp\nu1,a,click,{T}\n")
    res = cli.invoke(app, ["import", "events", str(hdr), "--skip-invalid"])
    assert res.exit_code == 1 and "missing the required column occurred_at" in " ".join(res.output.split())
    res = cli.invoke(app, ["import", "events", str(_write(tmp_path / "e.csv", ""))])
    assert res.exit_code == 1 and "the file is empty" in " ".join(res.output.split())
    extra = _write(tmp_path / "x.csv", f"user_id,item_id,event_type,occurred_at,[note]\nu1,a,click,{T},x\n")
    res = cli.invoke(app, ["import", "events", str(extra)])
    assert res.exit_code == 0 and "warning:" in res.output and "[note]" in res.output
    assert _count(db, "events") == 1
