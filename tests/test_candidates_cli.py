"""The candidates commands end to end on a small generated world, and the recall evaluation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import TEST_DIM, TestDB
from typer.testing import CliRunner

from engine import candidates, cooccurrence, datasets
from engine.cli import app
from engine.config import get_settings
from engine.evaluation import candidates as evaluation

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
def world(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestDB]:
    data = datasets.generate(datasets.GeneratorConfig(users=120, items=200, events=4000, days=60, dim=TEST_DIM,
                                                      seed=3), now=NOW)
    data.load(db.conn)
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(TEST_DIM))
    get_settings.cache_clear()
    try:
        yield db
    finally:
        get_settings.cache_clear()


def test_cli_commands(world: TestDB) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train", "cooccurrence", "--as-of", (NOW - timedelta(days=5)).isoformat()])
    assert res.exit_code == 0, res.output
    assert "full build" in res.output
    res = runner.invoke(app, ["train", "cooccurrence", "--incremental"])
    assert res.exit_code == 0, res.output
    assert "incremental build" in res.output
    res = runner.invoke(app, ["candidates", "u1", "--n", "40", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    seen = {r[0] for r in world.conn.execute(
        "SELECT DISTINCT i.item_id FROM pgrec.events e JOIN pgrec.items i USING (item_key) "
        "JOIN pgrec.users u USING (user_key) WHERE u.user_id = 'u1'").fetchall()}
    assert len([r for r in rows if r["item_id"] not in seen]) == 40
    assert {"ann", "history", "trending", "popular"} <= {s for r in rows for s in r["sources"]}
    res = runner.invoke(app, ["candidates", "u1", "--n", "10", "--as-of", "not a time"])
    assert res.exit_code == 1 and "--as-of" in res.output
    res = runner.invoke(app, ["candidates", "u1", "--n", "0"])
    assert res.exit_code == 1 and "n must be between" in res.output
    res = runner.invoke(app, ["similar", "i3", "--k", "5", "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)) == 5
    res = runner.invoke(app, ["similar", "nope"])
    assert res.exit_code == 1 and "unknown item" in res.output
    res = runner.invoke(app, ["train", "neighbours", "--k", "5"])
    assert res.exit_code == 0, res.output
    assert "200 items, 1,000 rows" in res.output
    res = runner.invoke(app, ["train", "neighbours", "--stale-only"])
    assert res.exit_code == 0 and "0 items" in res.output, res.output
    res = runner.invoke(app, ["doctor"])
    assert res.exit_code == 0 and "200 of 200 items current" in res.output, res.output
    res = runner.invoke(app, ["train", "neighbours", "--k", "0"])
    assert res.exit_code == 1 and "k must be between 1 and 500" in res.output
    res = runner.invoke(app, ["trending", "--segment", "de", "--k", "5", "--json"])
    assert res.exit_code == 0, res.output
    assert 0 < len(json.loads(res.output)) <= 5


def test_eval_candidates_reports_recall_and_leaves_live_neighbours(world: TestDB, tmp_path: Path) -> None:
    cooccurrence.build(world.conn)
    live = world.conn.execute("SELECT * FROM pgrec.item_neighbors ORDER BY 1, 2").fetchall()
    report = evaluation.run(world.conn, split_fraction=0.9, ns=[10, 50, 200], max_users=15)
    assert report["users"] == 15
    for source in candidates.SOURCES:
        values = [report["recall"][source][str(n)] for n in (10, 50, 200)]
        assert values == sorted(values)  # recall grows with n
        assert all(0.0 <= v <= 1.0 for v in values)
    union = [report["union"][str(n)] for n in (10, 50, 200)]
    assert union == sorted(union) and union[-1] > 0.0
    assert report["union_mean_unseen_rows"]["50"] == pytest.approx(50.0)
    # built as of the split inside a rolled-back transaction: the live table is unchanged
    assert world.conn.execute("SELECT * FROM pgrec.item_neighbors ORDER BY 1, 2").fetchall() == live
    paths = evaluation.save(report, tmp_path)
    assert json.loads(paths["json"].read_text())["ns"] == [10, 50, 200]
    assert paths["png"].stat().st_size > 1000
    assert "| **union** |" in paths["md"].read_text()
    # the item vectors are not retrained as of the split: the report says when they may have seen the test window
    assert len(report["notes"]) == 1 and "not trained by pgrec" in report["notes"][0]
    assert "Note: the item vectors" in paths["md"].read_text()
    from engine.ranking import registry

    registry.save(world.conn, kind="retrieval", artifact=b"-", params={}, features=[], metrics={},
                  data_window={"last_event": NOW.isoformat()}, activate=False)
    world.conn.execute("UPDATE pgrec.models SET active = true WHERE kind = 'retrieval'")
    notes = evaluation.run(world.conn, split_fraction=0.9, ns=[10], max_users=2)["notes"]
    assert len(notes) == 1 and "after the split" in notes[0] and "pgrec train retrieval --as-of" in notes[0]
    # options of `pgrec eval` itself given before the subcommand would be ignored: refused instead
    res = CliRunner().invoke(app, ["eval", "--split-fraction", "0.5", "candidates", "--ns", "10"])
    assert res.exit_code == 1 and "--split-fraction belong to `pgrec eval` itself" in " ".join(res.output.split())


def test_bench_candidates_runs_on_a_tiny_catalog(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(TEST_DIM))
    get_settings.cache_clear()
    try:
        res = CliRunner().invoke(app, ["bench", "candidates", "--items", "300", "--requests", "5", "--n", "50"])
    finally:
        get_settings.cache_clear()
    assert res.exit_code == 0, res.output
    assert "embedding neighbours: 300 items" in res.output
    assert "source history" in res.output and "union pgrec.candidates n=50" in res.output


def test_bench_ab_compares_two_databases_call_by_call(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.bench import ab

    for i in range(12):
        db.conn.execute("SELECT pgrec.upsert_item(%s, ARRAY['c'])", (f"i{i}",))
        db.conn.execute("SELECT pgrec.set_item_embedding(%s, %s)",
                        (f"i{i}", [float((i * 7 + d) % 5) + 0.5 for d in range(TEST_DIM)]))
    for u in range(3):
        for i in range(u, u + 4):
            db.conn.execute("SELECT pgrec.track_event(%s, %s, 'like')", (f"u{u}", f"i{i}"))
    lines = list(ab.run(db.settings, db.name, db.name, calls=["candidates", "features"], users=3, n=5))
    assert lines[0].startswith(f"A = {db.name} (schema ") and f"B = {db.name}" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["candidates", "features"]
    assert all("3 users" in ln for ln in lines[1:])
    with pytest.raises(ValueError, match="unknown call 'nope'"):
        list(ab.run(db.settings, db.name, db.name, calls=["nope"]))
