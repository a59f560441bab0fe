"""Candidate source configuration: pgrec.candidate_sources refuses bad params on write (sql/sources/v1.sql),
the `pgrec sources` commands, and requests that follow what they set."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
import test_candidates_cli
from conftest import TestDB
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from engine import candidates, migrate
from engine.cli import app
from engine.db import connect

NOW = test_candidates_cli.NOW


def _write(db: TestDB, source: str, params: dict[str, Any], surface: str = "default") -> None:
    db.conn.execute("UPDATE pgrec.candidate_sources SET params = %s WHERE surface = %s AND source = %s",
                    (Jsonb(params), surface, source))


def _specs(db: TestDB) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s: [] for s in candidates.SOURCES}
    for source, param in db.conn.execute("SELECT source, param FROM pgrec.source_param_specs()").fetchall():
        out[source].append(param)
    return out


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at 80 columns


def test_seeded_and_good_rows_are_accepted(db: TestDB) -> None:
    assert db.scalar("SELECT count(*) FROM pgrec.candidate_sources WHERE surface = 'default'") == 5
    good = {
        "ann": {"ef_search": 1000, "iterative_scan": "strict_order", "max_scan_tuples": 1, "exact_max_rows": 0},
        "history": {"max_events": 1, "half_life_days": 0.5, "per_item": 1000, "embedding_items": 0,
                    "embedding_k": 1, "embedding_weight": 0, "ease_weight": 2.5},
        "trending": {"global_weight": 0},
        "fresh": {"days": 1.5, "max_scan": None},  # null = the default
        "popular": {},
    }
    assert set(good) == set(candidates.SOURCES)
    for source, params in good.items():
        _write(db, source, params)
    _write(db, "ann", {"iterative_scan": "off"})
    db.conn.execute("INSERT INTO pgrec.surfaces (surface) VALUES ('feed')")
    db.conn.execute("INSERT INTO pgrec.candidate_sources (surface, source, quota, params) "
                    "VALUES ('feed', 'ann', 1.0, '{\"ef_search\": 40}')")
    got = dict(db.conn.execute("SELECT source, params FROM pgrec.candidate_sources WHERE surface = 'default'").fetchall())
    assert got["history"] == good["history"] and got["ann"] == {"iterative_scan": "off"}
    # a cold request runs with every parameter at an edge of its range
    assert candidates.candidates(db.conn, "nobody", n=5) == []


@pytest.mark.parametrize(("source", "params", "param", "why"), [
    ("ann", {"ef_serach": 100}, "ef_serach", "unknown parameter"),
    ("popular", {"days": 3}, "days", "unknown parameter"),
    ("ann", {"ef_search": "abc"}, "ef_search", 'must be an integer >= 1 and <= 1000, got "abc"'),
    ("ann", {"ef_search": "100"}, "ef_search", 'must be an integer >= 1 and <= 1000, got "100"'),
    ("ann", {"ef_search": 100.5}, "ef_search", "must be an integer"),
    ("ann", {"ef_search": 100.0}, "ef_search", "must be an integer"),  # (params ->> 'ef_search')::int would fail
    ("ann", {"ef_search": 0}, "ef_search", "got 0"),
    ("ann", {"ef_search": 1001}, "ef_search", "got 1001"),
    ("ann", {"iterative_scan": "on"}, "iterative_scan", "must be one of relaxed_order, strict_order, off, got \"on\""),
    ("ann", {"iterative_scan": True}, "iterative_scan", "must be one of"),
    ("ann", {"max_scan_tuples": 2147483648}, "max_scan_tuples", "<= 2147483647"),
    ("history", {"half_life_days": 0}, "half_life_days", "must be a number > 0"),
    ("history", {"embedding_weight": -0.1}, "embedding_weight", "must be a number >= 0"),
    ("history", {"max_events": [30]}, "max_events", "must be an integer >= 1"),
    ("trending", {"global_weight": "0.5"}, "global_weight", "must be a number >= 0"),
    ("fresh", {"max_scan": 0}, "max_scan", "must be an integer >= 1"),
])
def test_bad_params_are_refused_naming_surface_source_and_key(
        db: TestDB, source: str, params: dict[str, Any], param: str, why: str) -> None:
    known = _specs(db)[source]
    before = db.scalar("SELECT params FROM pgrec.candidate_sources WHERE surface = 'default' AND source = %s",
                       (source,))
    with pytest.raises(psycopg.errors.InvalidParameterValue) as exc:
        _write(db, source, params)
    msg = exc.value.diag.message_primary or ""
    assert msg.startswith(f"candidate source {source} on surface 'default': params.{param}: "), msg
    assert why in msg
    hint = exc.value.diag.message_hint or ""
    assert (f"the parameters of {source} are {', '.join(known)}" in hint) if known else \
        hint == f"source {source} takes no parameters"
    assert db.scalar("SELECT params FROM pgrec.candidate_sources WHERE surface = 'default' AND source = %s",
                     (source,)) == before


def test_inserts_are_checked_too(db: TestDB) -> None:
    db.conn.execute("INSERT INTO pgrec.surfaces (surface) VALUES ('feed')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"surface 'feed': params\.days: must be a number > 0"):
        db.conn.execute("INSERT INTO pgrec.candidate_sources (surface, source, quota, params) "
                        "VALUES ('feed', 'fresh', 0.2, '{\"days\": -1}')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"params: must be a JSON object, got \[\]"):
        db.conn.execute("INSERT INTO pgrec.candidate_sources (surface, source, quota, params) "
                        "VALUES ('feed', 'fresh', 0.2, '[]')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="candidate source magic on surface 'feed': "
                       "unknown source") as exc:
        db.conn.execute("INSERT INTO pgrec.candidate_sources (surface, source, quota) VALUES ('feed', 'magic', 0.2)")
    assert exc.value.diag.message_hint == "the sources are ann, history, trending, fresh, popular"
    assert db.scalar("SELECT count(*) FROM pgrec.candidate_sources WHERE surface = 'feed'") == 0


def test_upgrade_fails_on_an_existing_bad_row(empty_db: TestDB) -> None:
    migrate.upgrade(empty_db.settings, "0010")
    with connect(empty_db.settings) as c:
        c.execute("""UPDATE pgrec.candidate_sources SET params = params || '{"ef_serach": 50}'
                     WHERE surface = 'default' AND source = 'ann'""")
    with pytest.raises(Exception, match=r"candidate source ann on surface 'default': params\.ef_serach: unknown"):
        migrate.upgrade(empty_db.settings, "0011")
    assert migrate.current(empty_db.settings).split()[0] == "0010"
    with connect(empty_db.settings) as c:  # nothing was fixed silently
        assert c.execute("SELECT params ? 'ef_serach' FROM pgrec.candidate_sources "
                         "WHERE surface = 'default' AND source = 'ann'").fetchone() == (True,)
        c.execute("UPDATE pgrec.candidate_sources SET params = params - 'ef_serach' "
                  "WHERE surface = 'default' AND source = 'ann'")
    migrate.upgrade(empty_db.settings, "0011")
    migrate.downgrade(empty_db.settings, "0010")
    with connect(empty_db.settings) as c:  # the check is gone with its revision
        c.execute("""UPDATE pgrec.candidate_sources SET params = '{"anything": 1}' WHERE source = 'popular'""")


def test_docs_list_the_keys_the_database_knows(db: TestDB) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "contracts.md").read_text()
    section = text[text.index("### Candidate source parameters"):]
    section = section[:section.index("\n## ")]
    documented: dict[str, list[str]] = {}
    for row in section.splitlines():
        if row.startswith("| `"):
            cells = row.split("|")
            documented.setdefault(cells[1].strip(" `"), []).extend(re.findall(r"`([a-z_]+)`", cells[2]))
    assert documented == _specs(db)


# ---------------------------------------------------------------- the CLI and requests


# the small generated world of the candidates CLI tests (120 users, 200 items, 4,000 events up to NOW), with
# the CLI's settings pointed at it
world = test_candidates_cli.world


def _cli(*args: str, ok: bool = True) -> str:
    res = CliRunner().invoke(app, ["sources", *args])
    assert (res.exit_code == 0) == ok, res.output
    if not ok:
        assert res.exit_code == 1 and "Traceback" not in res.output
    return _flat(res.output)


def _rows(surface: str | None = None) -> dict[str, dict[str, Any]]:
    out = _cli("list", "--json", *(["--surface", surface] if surface else []))
    return {r["source"]: r for r in json.loads(out) if surface is None or r["surface"] in (surface, "default")}


def test_cli_params_and_list(world: TestDB) -> None:
    specs = _specs(world)
    out = _cli("params")
    for source, keys in specs.items():
        assert source in out
        for key in keys:
            assert f"{key}:" in out
    assert "popular: no parameters" in out and "default 100" in out
    as_json = json.loads(_cli("params", "--json"))
    assert {s: [p["param"] for p in ps] for s, ps in as_json.items()} == specs
    assert as_json["ann"][0] == {"param": "ef_search", "expects": "an integer >= 1 and <= 1000", "default": "100",
                                 "meaning": as_json["ann"][0]["meaning"]}

    everything = json.loads(_cli("list", "--json"))
    assert [(r["surface"], r["source"]) for r in everything] == [("default", s) for s in candidates.SOURCES]
    assert everything[0]["params"]["ef_search"] == 100 and everything[4]["fallback_order"] == 1
    out = _cli("list")
    assert "default" in out and "global_weight" in out
    # a surface without rows of its own shows the rows it uses
    world.conn.execute("INSERT INTO pgrec.surfaces (surface) VALUES ('email')")
    assert "surface email has no rows of its own" in _cli("list", "--surface", "email")
    assert {r["surface"] for r in json.loads(_cli("list", "--surface", "email", "--json"))} == {"default"}
    assert "unknown surface 'nope'" in _cli("list", "--surface", "nope", ok=False)


def test_cli_set_copies_defaults_and_the_database_decides(world: TestDB) -> None:
    defaults = _rows("default")
    out = _cli("set", "feed", "ann", "--param", "ef_search=200", "--param", "iterative_scan=strict_order",
               "--quota", "0.5")
    assert "created surface feed" in out and "copied the 'default' rows to surface feed" in out
    feed = _rows("feed")
    assert {r["surface"] for r in feed.values()} == {"feed"} and set(feed) == set(candidates.SOURCES)
    assert feed["ann"]["params"] == {**defaults["ann"]["params"], "ef_search": 200, "iterative_scan": "strict_order"}
    assert feed["ann"]["quota"] == 0.5
    assert {s: r for s, r in feed.items() if s != "ann"} == {
        s: {**r, "surface": "feed"} for s, r in defaults.items() if s != "ann"}
    assert json.loads(_cli("list", "--surface", "default", "--json")) == [defaults[s] for s in candidates.SOURCES]

    out = _cli("set", "feed", "ann", "--unset-param", "ef_search", "--disable", "--fallback-order", "2")
    assert "created surface" not in out and "copied" not in out
    ann = _rows("feed")["ann"]
    assert "ef_search" not in ann["params"] and not ann["enabled"] and ann["fallback_order"] == 2
    _cli("set", "feed", "ann", "--enable", "--no-fallback")
    ann = _rows("feed")["ann"]
    assert ann["enabled"] and ann["fallback_order"] is None

    # refused by the database (or the CLI), cleanly, nothing written
    before = _rows("feed")
    for args, message in [
        (["--param", "ef_search=abc"], "candidate source ann on surface 'feed': params.ef_search: must be an "
                                       'integer >= 1 and <= 1000, got "abc"'),
        (["--param", "ef_serach=100"], "params.ef_serach: unknown parameter (the parameters of ann are ef_search, "
                                       "iterative_scan, max_scan_tuples, exact_max_rows"),
        (["--param", "ef_search=100.5"], "must be an integer"),
        (["--param", "iterative_scan=on"], 'must be one of relaxed_order, strict_order, off, got "on"'),
        (["--quota", "1.5"], "--quota must be a number between 0 and 1, got 1.5"),
        (["--quota", "nan"], "--quota must be a number between 0 and 1, got nan"),
        (["--fallback-order", "0"], "--fallback-order must be between 1 and 2147483647, got 0"),
        (["--param", "ef_search=1e400"], "--param ef_search is not valid JSON: 1e400 is not a finite number"),
        (["--param", "ef_search"], "expected key=value"),
        (["--param", "ef_search=1", "--unset-param", "ef_search"], "both --param and --unset-param"),
        (["--fallback-order", "1", "--no-fallback"], "not both"),
        ([], "nothing to change"),
    ]:
        assert message in _cli("set", "feed", "ann", *args, ok=False), args
    assert _rows("feed") == before
    assert "unknown source 'magic'" in _cli("set", "feed", "magic", "--quota", "0.1", ok=False)
    assert "not a valid surface name" in _cli("set", "Bad Surface", "ann", "--quota", "0.1", ok=False)
    assert "unknown parameter" in _cli("set", "news", "popular", "--param", "days=3", ok=False)
    assert world.scalar("SELECT count(*) FROM pgrec.surfaces WHERE surface = 'news'") == 0  # rolled back

    # a surface with some rows gets the missing source from 'default'; with no 'default' row, --quota is needed
    world.conn.execute("INSERT INTO pgrec.surfaces (surface) VALUES ('similar')")
    world.conn.execute("INSERT INTO pgrec.candidate_sources (surface, source, quota) VALUES ('similar', 'ann', 1.0)")
    assert "copied the 'default' row of fresh" in _cli("set", "similar", "fresh", "--param", "days=3")
    assert _rows("similar")["fresh"]["params"] == {"days": 3}
    world.conn.execute("DELETE FROM pgrec.candidate_sources WHERE surface = 'default' AND source = 'trending'")
    assert "give --quota" in _cli("set", "similar", "trending", "--param", "global_weight=1", ok=False)
    assert "added source trending" in _cli("set", "similar", "trending", "--quota", "0.2",
                                           "--param", "global_weight=1")
    assert _rows("similar")["trending"]["params"] == {"global_weight": 1}


def test_requests_follow_what_sources_set_changes(world: TestDB) -> None:
    n = 40

    def count(surface: str, user: str = "nobody") -> dict[str, int]:
        rows = candidates.candidates(world.conn, user, n=n, surface=surface, as_of=NOW)
        return {s: sum(1 for r in rows if s in r.sources) for s in candidates.SOURCES}

    # a cold user: each non-fallback source brings exactly ceil(quota * n) rows (nothing seen to over-fetch);
    # quotas exact in binary, as the union multiplies the real column (ceil(0.1::real * 40) = 5)
    default_before = count("default")
    _cli("set", "feed", "trending", "--quota", "0.125")
    assert count("feed")["trending"] == 5
    _cli("set", "feed", "trending", "--quota", "0.25")
    assert count("feed")["trending"] == 10
    assert count("default") == default_before  # 'default' untouched
    _cli("set", "feed", "trending", "--disable")
    assert count("feed")["trending"] == 0

    # a known user: the ann source still runs with the parameters set, and stops when disabled
    user = world.scalar("SELECT u.user_id FROM pgrec.users u JOIN pgrec.events e USING (user_key) "
                        "WHERE e.polarity = 1 GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1")
    _cli("set", "feed", "ann", "--param", "ef_search=40", "--param", "iterative_scan=strict_order",
         "--param", "max_scan_tuples=5000")
    assert count("feed", user)["ann"] >= math.ceil(0.4 * n)
    _cli("set", "feed", "ann", "--disable")
    assert count("feed", user)["ann"] == 0
    assert count("default", user)["ann"] >= math.ceil(0.4 * n)
