"""``pgrec eval`` end to end on a small generated world, and the ranker CLI."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import TestDB
from typer.testing import CliRunner

from engine import datasets
from engine.config import get_settings
from engine.evaluation import funnel, report
from engine.ranking.train import RankerConfig

NOW = datetime.fromisoformat("2026-06-01T00:00:00+00:00")


def _world(db: TestDB) -> None:
    datasets.generate(datasets.GeneratorConfig(users=150, items=120, events=3500, days=60, dim=16, seed=11),
                      now=NOW).load(db.conn)


def _record_ease_builds(monkeypatch: pytest.MonkeyPatch) -> list[datetime | None]:
    """The as_of of every EASE neighbour build from now on (the builds still run)."""
    from engine import itemsim

    seen: list[datetime | None] = []
    build_ease = itemsim.build_ease

    def recording(conn: object, *, as_of: datetime | None = None, **kw: object) -> itemsim.EaseBuild:
        seen.append(as_of)
        return build_ease(conn, as_of=as_of, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(itemsim, "build_ease", recording)
    return seen


def test_eval_reports_every_method(db: TestDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _world(db)
    ease_as_of = _record_ease_builds(monkeypatch)
    # no n of its own: the ranker trains on the count it is tested with (its own default is the serving count)
    rc = RankerConfig(horizon_days=7, cutoffs=1, max_users_per_cutoff=20, num_boost_round=30,
                      min_data_in_leaf=5, num_threads=1)
    config = funnel.EvalConfig(split_at=NOW - timedelta(days=7), n_candidates=30, max_users=15, retrieval=False,
                               candidate_counts=(10, 30), recall_users=8, ranker=rc)
    result, trained = funnel.run(db.conn, config)
    assert result.ranker["config"]["n_candidates"] == 30
    assert set(result.methods) == {"funnel", "popularity", "ease", *(f"source:{s}" for s in funnel.SOURCES)}
    for vals in result.methods.values():
        assert all(0.0 <= v <= 1.0 for v in vals.values())
    assert result.methods["popularity"]["ndcg@10"] > 0  # the generated world has popular items
    assert result.split["users"] == 15
    recall = result.recall_vs_candidates["recall"]
    assert recall[0] <= recall[1]  # more candidates never find less
    assert trained.names == list(result.importance) or set(trained.names) == set(result.importance)
    # training never saw a label at or after the split
    assert result.ranker["data_window"]["until"] == config.split_at.isoformat()  # type: ignore[union-attr]
    # EASE neighbours as of each ranker cutoff (no label window in them), then as of the split for the test
    cutoffs = [datetime.fromisoformat(c) for c in result.split["ranker_cutoffs"]]
    assert ease_as_of == [*cutoffs, config.split_at]
    paths = report.write(result, tmp_path, command="pgrec eval --split-at ...")
    data = json.loads(paths["json"].read_text())
    s = data["summary"]
    assert s["ratio"] == pytest.approx(s["funnel_ndcg@10"] / s["best_baseline_ndcg@10"])
    for key in ("methods", "recall", "importance"):
        assert paths[key].stat().st_size > 1000
    assert "funnel" in paths["html"].read_text()


def test_models_and_explain_commands(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cli import app
    from engine.ranking import registry
    from engine.ranking.train import train_ranker

    _world(db)
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", "16")
    get_settings.cache_clear()
    try:
        rc = RankerConfig(horizon_days=7, cutoffs=1, n_candidates=20, max_users_per_cutoff=15, num_boost_round=10,
                          min_data_in_leaf=5, num_threads=1)
        trained = train_ranker(db.conn, rc)
        v1 = trained.save(db.conn, activate=True)
        v2 = trained.save(db.conn, activate=True)
        runner = CliRunner()
        out = runner.invoke(app, ["models", "list", "--json"])
        assert out.exit_code == 0, out.output
        assert [m["version"] for m in json.loads(out.output) if m["active"]] == [v2]
        out = runner.invoke(app, ["models", "rollback"])
        assert out.exit_code == 0, out.output
        assert registry.active_version(db.conn) == v1
        out = runner.invoke(app, ["models", "activate", "12345"])
        assert out.exit_code == 1 and "12345" in out.output
        assert registry.active_version(db.conn) == v1
        out = runner.invoke(app, ["explain", "u1", "i3", "--json", "--n", "20"])
        assert out.exit_code == 0, out.output
        ex = json.loads(out.output)
        assert ex["model_version"] == v1
        assert {c["name"] for c in ex["contributions"]} == set(registry.load(db.conn, v1).features)
        out = runner.invoke(app, ["explain", "u1", "no-such-item"])
        assert out.exit_code == 1 and "no-such-item" in out.output
        # without --n, explain ranks the serving count of candidates, as the served lists were ranked
        db.conn.execute("INSERT INTO pgrec.config (key, value) VALUES ('serving_candidates', '20') "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        out = runner.invoke(app, ["explain", "u1", "i3", "--json"])
        assert out.exit_code == 0, out.output

        def sourced(e: dict[str, Any]) -> dict[str, Any]:  # what the candidate count decides (the rest moves with now)
            return {c["name"]: c["value"] for c in e["contributions"]
                    if c["name"].endswith(("_score", "_rank")) or c["name"] == "f_n_sources"} | {"s": e["sources"]}

        assert sourced(json.loads(out.output)) == sourced(ex)
        out = runner.invoke(app, ["models", "rollback", "--kind", "foo"])
        assert out.exit_code == 1 and "unknown model kind 'foo'" in out.output
        for args, why in ((["train", "ranker", "--cutoffs", "2026-01-01"], "--cutoffs needs at least two times"),
                          (["train", "ranker", "--attribution-hours", "2"], "--attribution-hours is for --from impressions"),
                          (["train", "ranker", "--recompute-features"], "--recompute-features is for --from impressions"),
                          (["train", "ranker", "--from", "impressions", "--attribution-hours", "-1"],
                           "--attribution-hours must be between 0 and 87600"),
                          (["eval", "--max-users", "0"], "--max-users must be >= 1"),
                          (["eval", "--test-days", "-1"], "--test-days must be > 0"),
                          (["eval", "--cutoff-count", "0"], "--cutoff-count must be >= 1")):
            out = runner.invoke(app, args)
            assert out.exit_code == 1 and why in " ".join(out.output.split()), (args, out.output)
        # `pgrec policy explain` re-ranks the list as served: scored by the active ranker (it used a rank fusion)
        from engine import policies
        from engine.pipeline import Recommender

        with Recommender(get_settings()) as rec:
            served = rec.recommend("u1", k=5, log=False)
        explained = policies.explain(db.conn, "u1", k=5)
        assert explained.item_ids == [i.item_id for i in served.items] and len(served.items) == 5
        assert [it.score for it in explained.items] == pytest.approx([i.score for i in served.items], abs=1e-9)
        with Recommender(get_settings()) as rec:
            served = rec.recommend("u1", k=5, log=False, exclude_seen=True)
        explained = policies.explain(db.conn, "u1", k=5, context={"exclude_seen": True})
        assert explained.item_ids == [i.item_id for i in served.items]
        out = runner.invoke(app, ["policy", "explain", "u1", "--context", "[1]"])
        assert out.exit_code == 1 and "context must be a JSON object" in out.output
    finally:
        get_settings.cache_clear()


def test_train_all_keeps_label_windows_out_of_the_ranker_features(db: TestDB,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.ranking.train import default_cutoffs, train_all

    _world(db)
    ease_as_of = _record_ease_builds(monkeypatch)
    rc = RankerConfig(horizon_days=7, cutoffs=1, n_candidates=20, max_users_per_cutoff=15, num_boost_round=10,
                      min_data_in_leaf=5, num_threads=1)
    result = train_all(db.conn, rc, retrieval=True, retrieval_epochs=2)
    builds = [r[0] for r in db.conn.execute("SELECT as_of FROM pgrec.cooccurrence_builds ORDER BY build_id")]
    last = db.scalar("SELECT max(occurred_at) FROM pgrec.events")
    cutoffs = default_cutoffs(last + timedelta(microseconds=1), rc)
    # one co-occurrence build as of each ranker cutoff, then one from every event for serving
    assert builds[:-1] == cutoffs and builds[-1] > last
    windows = [r[0] for r in db.conn.execute(
        "SELECT data_window ->> 'as_of' FROM pgrec.models WHERE kind = 'retrieval' ORDER BY version")]
    assert windows == [cutoffs[0].isoformat(), None]  # as of the first cutoff, then on everything
    assert db.scalar("SELECT active FROM pgrec.models WHERE version = %s", (result.retrieval_version,))
    assert result.ranker.metrics["train_groups"] > 0
    # EASE neighbours likewise: as of each cutoff, then from every event (as_of None = now) for serving
    assert ease_as_of == [*cutoffs, None]
    assert db.scalar("SELECT count(*) FROM pgrec.model_neighbors WHERE model = 'ease'") > 0


def test_cli_replay_defaults_match_the_ranker_config() -> None:
    """`pgrec train ranker`, `pgrec train all` and `pgrec eval` replay the same number of label windows as
    RankerConfig() by default: 19 cutoffs plus one, the latest half of the events at 2.5% per window (9 gave the
    MovieLens replays 200-350 training groups; twice the windows lifted the funnel, see docs/ranking.md)."""
    import typer.main

    from engine.cli import app

    rc = RankerConfig()
    assert rc.cutoffs == 19
    assert 0 < rc.window_share * (rc.cutoffs + 1) < 1
    root = typer.main.get_command(app)
    for path in (("train", "ranker"), ("train", "all"), ("eval",)):
        cmd = root
        for name in path:
            cmd = cmd.commands[name]  # type: ignore[attr-defined]
        defaults = {p.name: p.default for p in cmd.params}
        assert defaults["cutoff_count"] == rc.cutoffs, path
        assert defaults["window_share"] == rc.window_share, path
        assert defaults["valid_windows"] == rc.valid_windows, path


def test_cli_eval_leaves_the_served_models_as_they_were(db: TestDB, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`pgrec eval` trains co-occurrence, EASE and retrieval as of its cutoffs and split, in a transaction it
    rolls back (before, it left them in place of the served ones)."""
    from engine import cooccurrence, itemsim
    from engine.cli import app

    _world(db)
    cooccurrence.build(db.conn)
    itemsim.build_ease(db.conn)

    def served() -> tuple[object, ...]:
        return db.conn.execute(
            "SELECT (SELECT count(*) FROM pgrec.item_neighbors), (SELECT sum(score) FROM pgrec.item_neighbors), "
            "(SELECT count(*) FROM pgrec.model_neighbors), (SELECT sum(score) FROM pgrec.model_neighbors), "
            "(SELECT count(*) FROM pgrec.models), "
            "(SELECT string_agg(DISTINCT model_version, ',') FROM pgrec.item_embeddings)").fetchone()  # type: ignore[return-value]

    before = served()
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", "16")
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["eval", "--split-at", (NOW - timedelta(days=7)).isoformat(), "--n", "30",
                                       "--max-users", "10", "--cutoff-count", "1", "--ranker-horizon-days", "7",
                                       "--output", str(tmp_path / "ev")])
        assert out.exit_code == 0, out.output
        assert "funnel NDCG@10" in out.output
    finally:
        get_settings.cache_clear()
    assert served() == before
