"""A LightGBM model compiled to SQL, so apps that only speak SQL get the same scores as Python.

The booster's trees (``dump_model()``) become one plpgsql function per model version,
``pgrec.ranker_score_v<version>(f float8[]) RETURNS float8``, whose body is a single expression (over locals
``x<i> := f[i]``): the sum of one nested CASE per tree, in tree order, over float8 literals that round-trip exactly. It reproduces
``booster.predict(X, raw_score=True)`` bit for bit (the parity test allows 1e-9) including LightGBM's missing
values: NULL or NaN in ``f`` is a missing value, routed by each split's ``missing_type`` / ``default_left``
exactly as LightGBM's ``NumericalDecision`` does, and values within +-1e-35 of zero count as zero (LightGBM's
dense-row reader drops them). NaN becomes NULL once, when the locals are read, so that a split is one
comparison: a comparison with NULL is NULL, which CASE takes as false, and each CASE is written so that its
ELSE branch is the missing value's side (a test for NaN at every split cost a quarter of the evaluation).
Categorical splits and linear trees are refused.

plpgsql caches the expression's plan per session, so a call costs one expression evaluation; the serving
path gives it a few hundred candidates at most (docs/PERFORMANCE: ~30 ms for 500 rows x 100 trees).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from engine.errors import InvalidRequest, NotFound
from engine.sql import query

# LightGBM's kZeroThreshold is the float 1e-35f; its dense reader compares |x| > kZeroThreshold in double.
ZERO = float(np.float32(1e-35))


class CompileError(InvalidRequest):
    """The model uses something the SQL compiler does not support (the message says what)."""


@dataclass(frozen=True)
class CompiledModel:
    """The SQL for one model version."""

    version: int
    function_name: str
    features: list[str]
    num_trees: int
    sql: str  # the CREATE FUNCTION statement


def function_name(version: int) -> str:
    return f"ranker_score_v{int(version)}"


def _lit(v: float) -> str:
    if not math.isfinite(v):
        raise CompileError(f"non-finite constant {v!r} in the model")
    return f"{float(v)!r}::float8"


def _split(node: dict[str, Any], tree: int) -> str:
    """``CASE WHEN <cond> THEN <one side> ELSE <other side> END``; each subtree appears once."""
    if node.get("decision_type", "<=") != "<=":
        raise CompileError(f"tree {tree}: categorical split on feature {node.get('split_feature')} is not supported")
    x = f"x{int(node['split_feature']) + 1}"
    t = float(node["threshold"])
    if not math.isfinite(t):
        raise CompileError(f"tree {tree}: non-finite threshold {t!r}")
    missing = node.get("missing_type", "None")
    default_left = bool(node.get("default_left", True))
    left, right = _node(node["left_child"], tree), _node(node["right_child"], tree)
    # x is never NaN (the locals fold it into NULL) and a comparison with NULL is NULL, which CASE treats as
    # false: each CASE below tests the side a missing value does not take, so NULL falls to the ELSE branch.
    # LightGBM reads |x| <= ZERO as 0, so near-zero thresholds compare against +-ZERO.
    if missing == "Zero":  # NULL, NaN and zero take the default side
        nonzero = f"({x} < {_lit(-ZERO)} OR {x} > {_lit(ZERO)})"
        if default_left:
            return f"CASE WHEN {x} > {_lit(t)} AND {nonzero} THEN {right} ELSE {left} END"
        return f"CASE WHEN {x} <= {_lit(t)} AND {nonzero} THEN {left} ELSE {right} END"
    if missing == "NaN":
        missing_left = default_left
    elif missing == "None":  # missing is read as 0
        missing_left = 0.0 <= t
    else:
        raise CompileError(f"tree {tree}: unknown missing_type {missing!r}")
    if abs(t) < ZERO:  # x in [-ZERO, ZERO] is 0: the effective threshold moves to the edge of that band
        go_right = f"{x} > {_lit(ZERO)}" if t >= 0 else f"{x} >= {_lit(-ZERO)}"
        go_left = f"{x} <= {_lit(ZERO)}" if t >= 0 else f"{x} < {_lit(-ZERO)}"
    else:
        go_right, go_left = f"{x} > {_lit(t)}", f"{x} <= {_lit(t)}"
    if missing_left:
        return f"CASE WHEN {go_right} THEN {right} ELSE {left} END"
    return f"CASE WHEN {go_left} THEN {left} ELSE {right} END"


def _node(node: dict[str, Any], tree: int) -> str:
    if "leaf_value" in node:
        if "leaf_coeff" in node or "leaf_const" in node:
            raise CompileError(f"tree {tree}: linear trees are not supported")
        return _lit(float(node["leaf_value"]))
    return _split(node, tree)


def score_expression(dump: dict[str, Any]) -> str:
    """The raw score as one SQL expression over variables ``x1 .. xN`` (the model's features, in order)."""
    if int(dump.get("num_tree_per_iteration", 1)) != 1 or int(dump.get("num_class", 1)) != 1:
        raise CompileError("only single-output models (regression, binary, ranking) can be compiled")
    trees = dump.get("tree_info") or []
    if not trees:
        return "0::float8"
    # left-associative: (((t0 + t1) + t2) ...), the order LightGBM sums in
    return "\n  + ".join(f"({_node(t['tree_structure'], int(t.get('tree_index', n)))})" for n, t in enumerate(trees))


def compile_model(dump: dict[str, Any] | str, version: int) -> CompiledModel:
    """The CREATE FUNCTION statement for a booster's ``dump_model()`` (a dict or its JSON text)."""
    d: dict[str, Any] = json.loads(dump) if isinstance(dump, str) else dump
    name = function_name(version)
    features = [str(f) for f in d.get("feature_names", [])]
    expr = score_expression(d)
    # one local per feature: reading a variable is about twice as fast as subscripting the array at every split;
    # NaN is read as NULL (the splits above rely on it)
    used = sorted({int(m) for m in re.findall(r"\bx(\d+)\b", expr)})
    declare = "".join(f"\n  x{i} float8 := nullif(f[{i}], 'NaN'::float8);" for i in used)
    sql = f"""CREATE OR REPLACE FUNCTION pgrec.{name}(f float8[])
RETURNS float8
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $ranker$
DECLARE{declare}
BEGIN
  RETURN {expr};
END
$ranker$"""
    return CompiledModel(int(version), name, features, len(d.get("tree_info") or []), sql)


def compile_booster(booster: Any, version: int) -> CompiledModel:
    """Compile an in-memory ``lightgbm.Booster``."""
    return compile_model(booster.dump_model(), version)


def install_compiled_model(conn: psycopg.Connection[Any], version: int) -> CompiledModel:
    """Compile the model row ``version`` of ``pgrec.models`` into ``pgrec.ranker_score_v<version>`` and record it
    in ``pgrec.compiled_rankers``. Idempotent; the registry calls it when a model is activated.
    Raises NotFound for an unknown version and CompileError for an unsupported model; either changes nothing."""
    import lightgbm as lgb  # training-side dependency, only when compiling

    row = conn.execute(query("serving.model_artifact"), {"version": version}).fetchone()
    if row is None:
        kind = conn.execute(query("serving.model_kind"), {"version": version}).fetchone()
        if kind is not None:
            raise CompileError(f"model version {version} is a {kind[0]} model: only rankers compile to SQL")
        raise NotFound(f"model version {version} does not exist")
    artifact, features = row
    if artifact is None:
        raise NotFound(f"model version {version} has no artifact")
    booster = lgb.Booster(model_str=bytes(artifact).decode("utf-8"))
    compiled = compile_booster(booster, version)
    names = [str(f) for f in (features or compiled.features)]
    if len(names) != len(compiled.features):
        raise CompileError(f"model version {version}: {len(names)} features in pgrec.models, "
                           f"{len(compiled.features)} in the booster")
    with conn.transaction():
        conn.execute(compiled.sql)
        conn.execute(f"REVOKE ALL ON FUNCTION pgrec.{compiled.function_name}(float8[]) FROM PUBLIC")
        conn.execute(f"COMMENT ON FUNCTION pgrec.{compiled.function_name}(float8[]) IS "
                     f"'ranker model version {int(version)} compiled to SQL: raw LightGBM score of a feature array'")
        conn.execute(query("serving.record_compiled"), {
            "version": version, "function_name": compiled.function_name,
            "features": json.dumps(names), "num_trees": compiled.num_trees})
    return CompiledModel(compiled.version, compiled.function_name, names, compiled.num_trees, compiled.sql)


def drop_compiled_model(conn: psycopg.Connection[Any], version: int) -> bool:
    """Remove the compiled function of ``version``; returns whether there was one."""
    with conn.transaction():
        conn.execute(f"DROP FUNCTION IF EXISTS pgrec.{function_name(version)}(float8[])")
        cur = conn.execute(query("serving.forget_compiled"), {"version": version})
    return cur.rowcount > 0
