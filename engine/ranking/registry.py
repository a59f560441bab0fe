"""The model registry (``pgrec.models``): save, list, activate, rollback, and the serving cache.

At most one model per kind is active. Every activation and rollback is logged in ``pgrec.model_activations``;
a rollback returns to the model that was active before the current one. ``ActiveModel`` caches the active
LightGBM booster in a serving process and notices a change of active model without a restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from engine.errors import InvalidRequest, NotFound
from engine.sql import query

RANKER = "ranker"


@dataclass
class ModelInfo:
    version: int
    kind: str
    created_at: datetime
    active: bool
    activated_at: datetime | None
    params: dict[str, Any]
    features: list[str]
    metrics: dict[str, Any]
    data_window: dict[str, Any]
    artifact_bytes: int | None = None


def save(conn: psycopg.Connection[Any], *, kind: str, artifact: bytes, params: dict[str, Any],
         features: Sequence[str], metrics: dict[str, Any], data_window: dict[str, Any],
         activate: bool = False) -> int:
    """Store a model; returns its version. ``activate`` also makes it the active one of its kind."""
    with conn.transaction():
        row = conn.execute(query("ranking.model_insert"), {
            "kind": kind, "artifact": artifact, "params": Jsonb(params), "features": Jsonb(list(features)),
            "metrics": Jsonb(metrics), "data_window": Jsonb(data_window)}).fetchone()
        assert row is not None
        version = int(row[0])
        if activate:
            _activate(conn, kind, version, "activate")
    return version


def list_models(conn: psycopg.Connection[Any], kind: str | None = None) -> list[ModelInfo]:
    """Every model (of ``kind``), newest first."""
    rows = conn.execute(query("ranking.model_list"), {"kind": kind}).fetchall()
    return [ModelInfo(*r) for r in rows]


def get(conn: psycopg.Connection[Any], version: int) -> tuple[ModelInfo, bytes | None]:
    row = conn.execute(query("ranking.model_get"), {"version": version}).fetchone()
    if row is None:
        raise NotFound(f"model version {version} does not exist")
    *info, artifact = row
    return ModelInfo(*info), (bytes(artifact) if artifact is not None else None)


def active_version(conn: psycopg.Connection[Any], kind: str = RANKER) -> int | None:
    row = conn.execute(query("ranking.model_active_version"), {"kind": kind}).fetchone()
    return int(row[0]) if row else None


def _activate(conn: psycopg.Connection[Any], kind: str, version: int, action: str) -> None:
    conn.execute(query("ranking.model_lock_kind"), {"kind": kind})
    conn.execute(query("ranking.model_deactivate"), {"kind": kind})
    cur = conn.execute(query("ranking.model_set_active"), {"version": version, "kind": kind})
    if cur.rowcount != 1:
        raise NotFound(f"model version {version} of kind {kind!r} does not exist")
    conn.execute(query("ranking.model_log_activation"), {"kind": kind, "version": version, "action": action})
    if kind == RANKER:
        # the SQL-only path serves the active ranker as a compiled SQL function: make it in the same transaction
        import lightgbm as lgb

        from engine.ranking.compile import CompileError, install_compiled_model

        try:
            install_compiled_model(conn, version)
        except (CompileError, lgb.basic.LightGBMError) as exc:
            raise InvalidRequest(f"model version {version} cannot be served: {exc}") from None


def activate(conn: psycopg.Connection[Any], version: int) -> ModelInfo:
    """Make ``version`` the active ranker (the previous one is deactivated). Unknown: NotFound. Already active:
    nothing changes (and nothing is logged, so a rollback still returns to the one before)."""
    info, artifact = get(conn, version)
    _only_rankers(info.kind, f"model version {version} ({info.kind})")
    if artifact is None:
        raise InvalidRequest(f"model version {version} has no artifact and cannot be served")
    if info.active:
        return info
    with conn.transaction():
        _activate(conn, info.kind, version, "activate")
    return get(conn, version)[0]


def _only_rankers(kind: str, what: str) -> None:
    # a retrieval model's vectors are written (and it is activated) when it is trained; its stored row keeps the
    # weights for the record, not the user-feature vocabulary needed to serve it again
    if kind not in (RANKER, "retrieval"):
        raise InvalidRequest(f"unknown model kind {kind!r}: pgrec's models are ranker and retrieval")
    if kind != RANKER:
        raise InvalidRequest(f"{what} cannot be activated or rolled back: only rankers can; the served item vectors "
                             "are those of the latest training (`pgrec train retrieval [--as-of TS]`)")


def _stack(conn: psycopg.Connection[Any], kind: str) -> list[int]:
    """The activation history as a stack: activate pushes, rollback pops."""
    stack: list[int] = []
    for version, action in conn.execute(query("ranking.model_activation_log"), {"kind": kind}).fetchall():
        if action == "activate":
            stack.append(int(version))
        elif stack:
            stack.pop()
    return stack


def rollback(conn: psycopg.Connection[Any], kind: str = RANKER) -> ModelInfo:
    """Re-activate the model that was active before the current one. Nothing to return to: InvalidRequest."""
    _only_rankers(kind, f"{kind} models")
    with conn.transaction():
        conn.execute(query("ranking.model_lock_kind"), {"kind": kind})
        stack = _stack(conn, kind)
        current = active_version(conn, kind)
        if current is None or len(stack) < 2 or stack[-1] != current:
            raise InvalidRequest(f"no earlier {kind} model to roll back to"
                                 + ("" if current is not None else f" (no {kind} is active)"))
        target = stack[-2]
        conn.execute(query("ranking.model_deactivate"), {"kind": kind})
        cur = conn.execute(query("ranking.model_set_active"), {"version": target, "kind": kind})
        if cur.rowcount != 1:
            raise NotFound(f"model version {target} was deleted; cannot roll back to it")
        conn.execute(query("ranking.model_log_activation"), {"kind": kind, "version": current, "action": "rollback"})
    return get(conn, target)[0]


# ---------------------------------------------------------------- the serving cache


@dataclass
class LoadedModel:
    """An active ranker in memory: the booster and its feature list (the column order it expects)."""

    version: int
    features: list[str]
    booster: Any  # lightgbm.Booster
    params: dict[str, Any]

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros(0)
        return np.asarray(self.booster.predict(x, num_threads=1), dtype=np.float64)


def load(conn: psycopg.Connection[Any], version: int) -> LoadedModel:
    """A model version as a LightGBM booster."""
    import lightgbm as lgb  # only where a model is used

    info, artifact = get(conn, version)
    if info.kind != RANKER:  # a retrieval model's artifact is not a booster
        raise InvalidRequest(f"model version {version} is a {info.kind} model, not a ranker")
    if artifact is None:
        raise InvalidRequest(f"model version {version} has no artifact")
    booster = lgb.Booster(model_str=artifact.decode("utf-8"))
    return LoadedModel(version, list(info.features), booster, dict(info.params))


class ActiveModel:
    """The active model of a kind, cached; re-checks which version is active at most every ``check_every_s``.

    ``get(conn)`` costs one indexed lookup every few seconds and a load only when the active version changed,
    so ``pgrec models activate`` / ``rollback`` reach a running server within ``check_every_s``.
    """

    def __init__(self, kind: str = RANKER, check_every_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kind = kind
        self.check_every_s = check_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._checked_at = float("-inf")

    def get(self, conn: psycopg.Connection[Any]) -> LoadedModel | None:
        """The active model (None when no model of the kind is active)."""
        now = self._clock()
        if now - self._checked_at < self.check_every_s:
            return self._model
        with self._lock:
            if now - self._checked_at < self.check_every_s:
                return self._model
            version = active_version(conn, self.kind)
            if version is None:
                self._model = None
            elif self._model is None or self._model.version != version:
                self._model = load(conn, version)
            self._checked_at = now
            return self._model

    def invalidate(self) -> None:
        """Check again on the next ``get``."""
        self._checked_at = float("-inf")
