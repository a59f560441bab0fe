"""The LightGBM -> SQL compiler reproduces booster.predict(raw_score=True) on random data, missing values included."""

from __future__ import annotations

import json
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from conftest import TestDB

from engine.errors import NotFound
from engine.ranking import compile as rc


def _data(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    x[rng.random((n, d)) < 0.1] = np.nan     # missing values
    x[rng.random((n, d)) < 0.1] = 0.0        # exact zeros (matter for zero_as_missing)
    x[rng.random((n, d)) < 0.02] = 1e-40     # read as zero by LightGBM
    x[:, 0] = np.round(x[:, 0], 1)           # repeated values land exactly on thresholds
    return x


def _train(x: np.ndarray, y: np.ndarray, **params: Any) -> lgb.Booster:
    base = {"objective": "regression", "num_leaves": 15, "learning_rate": 0.2, "min_data_in_leaf": 5,
            "verbose": -1, "num_threads": 1, "seed": 1}
    base.update(params)
    names = [f"feat_{i}" for i in range(x.shape[1])]
    return lgb.train(base, lgb.Dataset(x, y, feature_name=names), num_boost_round=25)


def _sql_scores(db: TestDB, fn: str, x: np.ndarray, missing: str | None = None) -> np.ndarray:
    """The SQL function's scores of the rows of x; a missing value is sent as NULL, or as ``missing`` ('NaN')."""
    rows = [[missing if np.isnan(v) else float(v) for v in row] for row in x]
    got = db.conn.execute(
        f"SELECT pgrec.{fn}(r.f) FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS j(v, ord), "
        "LATERAL (SELECT array_agg(e::float8 ORDER BY o) AS f "
        "         FROM jsonb_array_elements_text(j.v) WITH ORDINALITY AS t(e, o)) r ORDER BY j.ord",
        (json.dumps(rows),),
    ).fetchall()
    return np.array([g[0] for g in got], dtype=np.float64)


@pytest.mark.parametrize("params", [
    {},                                               # missing_type NaN, learned default directions
    {"zero_as_missing": True},                        # missing_type Zero
    {"use_missing": False},                           # missing_type None: NaN read as 0
    {"objective": "lambdarank", "min_data_in_leaf": 3},
])
def test_compiled_sql_matches_booster(db: TestDB, params: dict[str, Any]) -> None:
    rng = np.random.default_rng(3)
    x = _data(rng, 600, 6)
    y = np.nan_to_num(x[:, 0]) * 2 + np.isnan(x[:, 1]) + (x[:, 2] == 0) + rng.normal(scale=0.1, size=600)
    if params.get("objective") == "lambdarank":
        y = np.clip(np.round(y - y.min()), 0, 4).astype(int)
        ds_groups = [20] * 30
        names = [f"feat_{i}" for i in range(x.shape[1])]
        booster = lgb.train({"objective": "lambdarank", "num_leaves": 15, "min_data_in_leaf": 3, "verbose": -1,
                             "num_threads": 1}, lgb.Dataset(x, y, group=ds_groups, feature_name=names),
                            num_boost_round=25)
    else:
        booster = _train(x, y, **params)
    compiled = rc.compile_booster(booster, 9001)
    db.conn.execute(compiled.sql)
    test_x = _data(np.random.default_rng(4), 400, 6)
    test_x[:5, :] = np.nan  # all missing
    want = booster.predict(test_x, raw_score=True)
    got = _sql_scores(db, compiled.function_name, test_x)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-9
    # a NaN in the array is a missing value too (the compiled function reads it as NULL)
    got_nan = _sql_scores(db, compiled.function_name, test_x, missing="NaN")
    assert np.max(np.abs(got_nan - want)) <= 1e-9
    assert compiled.features == [f"feat_{i}" for i in range(6)]
    assert compiled.num_trees == booster.num_trees()


def test_install_from_registry_row(db: TestDB) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 3))
    booster = _train(x, x[:, 0] - x[:, 1])
    version = db.scalar(
        "INSERT INTO pgrec.models (kind, artifact, features) VALUES ('ranker', %s, %s::jsonb) RETURNING version",
        (booster.model_to_string().encode(), json.dumps(["a", "b", "c"])),
    )
    compiled = rc.install_compiled_model(db.conn, version)
    assert compiled.function_name == f"ranker_score_v{version}"
    row = db.conn.execute(query := "SELECT function_name, features, num_trees FROM pgrec.compiled_rankers "
                                   "WHERE version = %s", (version,)).fetchone()
    assert row == (compiled.function_name, ["a", "b", "c"], booster.num_trees())
    got = _sql_scores(db, compiled.function_name, x[:50])
    assert np.max(np.abs(got - booster.predict(x[:50], raw_score=True))) <= 1e-9
    # not callable by PUBLIC (only through pgrec.recommend)
    public = db.scalar("SELECT count(*) FROM pg_proc p, aclexplode(p.proacl) a WHERE p.proname = %s "
                       "AND a.grantee = 0", (compiled.function_name,))
    assert public == 0
    assert rc.drop_compiled_model(db.conn, version)
    assert db.conn.execute(query, (version,)).fetchone() is None
    assert db.scalar("SELECT to_regproc(%s)", (f"pgrec.{compiled.function_name}",)) is None


def test_install_unknown_version_changes_nothing(db: TestDB) -> None:
    with pytest.raises(NotFound, match="model version 424242"):
        rc.install_compiled_model(db.conn, 424242)
    assert db.scalar("SELECT count(*) FROM pgrec.compiled_rankers") == 0


def test_categorical_split_is_refused() -> None:
    rng = np.random.default_rng(6)
    x = np.column_stack([rng.integers(0, 5, size=300), rng.normal(size=300)]).astype(float)
    booster = lgb.train({"objective": "regression", "verbose": -1, "min_data_in_leaf": 5, "num_threads": 1},
                        lgb.Dataset(x, x[:, 0] * 3 + x[:, 1], categorical_feature=[0]), num_boost_round=3)
    with pytest.raises(rc.CompileError, match="categorical"):
        rc.compile_booster(booster, 1)
