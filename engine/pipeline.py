"""The funnel for one request, from Python: candidates + features (one round trip), LightGBM in process,
policies + impressions (one round trip).

The SQL-only path (``pgrec.recommend``) runs the same stages inside PostgreSQL with the ranker compiled to SQL
(:mod:`engine.ranking.compile`); both read the candidate count (``pgrec.serving_candidates()``), the fallback
score (``pgrec.fallback_score``, when no ranker is active) and the tie order (score desc, item_key) from the
same place, and both finish through ``pgrec.finish_request``, so for the same model, data and ``as_of`` they
return the same items in the same order with the same scores.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from operator import itemgetter
from typing import Any, Protocol
from uuid import UUID

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from engine.config import Settings
from engine.db import DatabaseError, FeatureMatrix, connect, make_pool
from engine.errors import InvalidRequest, NotFound, Unavailable
from engine.ranking.registry import ActiveModel, LoadedModel, load
from engine.sql import query

log = logging.getLogger(__name__)

MAX_K = 1000
BATCH = 16  # users per round trip in recommend_many (one statement must stay within statement_timeout)


class Variant(Protocol):
    """An A/B arm (``engine.experiments.Variant``): the model version and policy set a request is served with."""

    @property
    def name(self) -> str: ...
    @property
    def model_version(self) -> int | None: ...
    @property
    def policy_set(self) -> str | None: ...
    # optional: ``experiment`` (the experiment the arm belongs to), logged with the impressions when present


@dataclass
class RecommendedItem:
    item_id: str
    score: float
    position: int
    reasons: dict[str, Any]


@dataclass
class Recommendation:
    """One served list. ``request_id`` is what events cite (None when the request was not logged)."""

    request_id: UUID | None
    user_id: str
    surface: str
    items: list[RecommendedItem]
    model_version: int | None
    variant: str | None
    dropped: dict[str, int]
    timings_ms: dict[str, float]
    candidates: dict[str, int] = field(default_factory=dict)  # candidates found per source
    # policies in force that did not run, with why (a request without the parameter a policy needs; a holdout)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class ScoredItem:
    item_id: str
    score: float


@dataclass
class _Scored:
    """Stage 2 output for one user: candidates best first (with the rows the ranker scored, when one did)."""

    item_keys: list[int]
    scores: list[float]
    sources: list[str]
    features: np.ndarray | None = None  # one row per item, in this order; columns: feature_names
    feature_names: Sequence[str] = ()


class Recommender:
    """The serving facade. Thread-safe; holds a connection pool and the active ranker (reloaded when the
    candidates round trip reports that another version became active)."""

    def __init__(self, settings: Settings, pool: ConnectionPool | None = None) -> None:
        self.settings = settings
        self._own_pool = pool is None
        self.pool = pool if pool is not None else make_pool(settings, name="pgrec-serving")
        # the candidates statement reports the active version on every request: no periodic check needed
        self._active = ActiveModel(check_every_s=float("inf"))
        self._pinned: dict[int, LoadedModel] = {}
        self._stats_day: date | None = None
        self._stats_retry_at = 0.0  # after a failed build (e.g. a read-only replica), wait before trying again
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> Recommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ public verbs

    def recommend(self, user_id: str, k: int = 10, surface: str = "default", context: dict[str, Any] | None = None,
                  as_of: datetime | None = None, log: bool | None = None, variant: Variant | None = None,
                  exclude_seen: bool = False) -> Recommendation:
        """The final list for a user: best first, each item with its score, position and reasons; logged as
        impressions in the same round trip as the policies when ``log`` is true (by default: unless ``as_of`` is
        given, as a replay is not a list anybody was shown, and its impressions would be training data for
        clicks that never followed it; ``pgrec.recommend`` in SQL logs unless ``log => false``). ``skipped``
        names the policies in force that did not run (a request without the parameter one needs, or the
        policies a holdout user skips). ``exclude_seen``: also
        leave out every item the user had any event with before ``as_of``, whatever the surface's policies say
        (as a request exclude list: the drops show as ``request_exclude``)."""
        return self.recommend_many([user_id], k, surface, context, as_of, log, variant, exclude_seen)[0]

    def recommend_many(self, user_ids: Iterable[str], k: int = 10, surface: str = "default",
                       context: dict[str, Any] | None = None, as_of: datetime | None = None,
                       log: bool | None = None, variant: Variant | None = None,
                       exclude_seen: bool = False) -> list[Recommendation]:
        """``recommend`` for many users (a list of ids), in batches: one candidates statement and one LightGBM
        call per batch, the policy calls pipelined. Returns one Recommendation per user id, in order."""
        # exclude_seen travels as context.exclude_seen: pgrec.finish_request turns it into the user's seen items
        # (the SQL-only path reads the same key)
        user_ids = _id_list(user_ids)
        ctx = _check(user_ids, k, surface, context, as_of)
        if log is None:
            log = as_of is None
        if exclude_seen:
            ctx = json.dumps(json.loads(ctx) | {"exclude_seen": True})
        self._ensure_item_stats()
        out: list[Recommendation] = []
        # one transaction: a call that fails leaves no impressions (nor new users) of its earlier users. One user
        # writes in one statement (pgrec.finish_request), atomic already: no BEGIN / COMMIT round trips for it.
        with self._connection() as conn, (conn.transaction() if len(user_ids) > 1 else nullcontext()):
            for start in range(0, len(user_ids), BATCH):
                out.extend(self._serve(conn, list(user_ids[start:start + BATCH]), k, surface, ctx, as_of, log,
                                       variant))
        return out

    def similar(self, item_id: str, k: int = 20) -> list[ScoredItem]:
        """Items like ``item_id`` (item-embedding HNSW neighbours plus co-occurrence). Unknown item: NotFound."""
        _check_k(k)
        _check_id("item_id", item_id)
        with self._connection() as conn:
            rows = conn.execute(query("serving.similar"), {"item_id": item_id, "k": k}).fetchall()
        return [ScoredItem(r[0], float(r[1])) for r in rows]

    def trending(self, k: int = 20, segment: str | None = None, as_of: datetime | None = None) -> list[ScoredItem]:
        """Time-decayed popularity, global or in one segment (user property ``segment_property``)."""
        _check_k(k)
        if segment is not None and (not isinstance(segment, str) or "\x00" in segment):
            raise InvalidRequest(f"segment must be a string (a value of the segment property), got {segment!r}")
        _check_as_of(as_of)
        with self._connection() as conn:
            rows = conn.execute(query("serving.trending"), {"segment": segment, "k": k, "as_of": as_of}).fetchall()
        return [ScoredItem(r[0], float(r[1])) for r in rows]

    # ------------------------------------------------------------ the day's item counter snapshot

    def _ensure_item_stats(self) -> None:
        """Once per UTC day and process, build today's snapshot of the ranker's item counters in the background
        (``pgrec.refresh_item_stats``; a no-op when another process built it). Until it exists the feature
        function aggregates the daily counters per request: the same numbers, slower."""
        today = datetime.now(UTC).date()
        with self._stats_lock:
            if self._stats_day == today or time.monotonic() < self._stats_retry_at:
                return
            self._stats_day = today
        threading.Thread(target=self._refresh_item_stats, name="pgrec-item-stats", daemon=True).start()

    def _refresh_item_stats(self) -> None:
        try:
            # its own connection: the serving pool's statement timeout is for requests, not this aggregate
            with connect(self.settings, check=False) as conn:
                conn.execute("SELECT pgrec.refresh_item_stats(NULL, true)")
        except (psycopg.Error, DatabaseError) as e:
            log.warning("building today's item counter snapshot failed (retrying in 15 minutes): %s", e)
            with self._stats_lock:
                self._stats_day = None
                self._stats_retry_at = time.monotonic() + 900

    # ------------------------------------------------------------ the funnel

    def _serve(self, conn: psycopg.Connection[Any], user_ids: list[str], k: int, surface: str, context: str,
               as_of: datetime | None, log: bool, variant: Variant | None) -> list[Recommendation]:
        t0 = time.perf_counter()
        model = self._model(conn, variant)
        rows, cols = self._candidates(conn, user_ids, surface, as_of, model)      # 1. candidates + features
        if variant is None or variant.model_version is None:
            active = rows[0][cols["active_model"]] if rows else (model.version if model else None)
            if active != (model.version if model else None):                    # another model was activated
                self._active.invalidate()
                model = self._model(conn, variant)
                rows, cols = self._candidates(conn, user_ids, surface, as_of, model)
        t1 = time.perf_counter()
        scored = _rank(rows, cols, user_ids, model)                               # 2. ranker (or fallback)
        t2 = time.perf_counter()
        # the rows the ranker scored go with a logged list unless config log_served_features is false
        send = log and bool(rows) and "log_features" in cols and bool(rows[0][cols["log_features"]])
        results = self._finish(conn, user_ids, k, surface, context, as_of, log, variant, model, scored, send)  # 3.
        t3 = time.perf_counter()
        timings = {"candidates_features": (t1 - t0) * 1e3, "rank": (t2 - t1) * 1e3,
                   "rerank_log": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3}
        if len(user_ids) > 1:
            timings["batch_users"] = float(len(user_ids))
        out = []
        for uid, res in zip(user_ids, results, strict=True):
            items = [RecommendedItem(str(it["item_id"]), float(it["score"]), int(it["position"]),
                                     dict(it.get("reasons") or {})) for it in res["items"]]
            found: dict[str, int] = {}
            for srcs in scored[uid].sources:
                for s in filter(None, srcs.split(",")):
                    found[s] = found.get(s, 0) + 1
            rid = res.get("request_id")
            out.append(Recommendation(UUID(rid) if rid else None, uid, surface, items, res.get("model_version"),
                                      variant.name if variant else None, dict(res.get("dropped") or {}),
                                      dict(timings), found, dict(res.get("skipped") or {})))
        return out

    def _model(self, conn: psycopg.Connection[Any], variant: Variant | None) -> LoadedModel | None:
        if variant is not None and variant.model_version is not None:
            v = int(variant.model_version)
            if v not in self._pinned:
                self._pinned[v] = load(conn, v)
            return self._pinned[v]
        return self._active.get(conn)

    def _candidates(self, conn: psycopg.Connection[Any], user_ids: list[str], surface: str,
                    as_of: datetime | None, model: LoadedModel | None) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
        return _candidate_rows(conn, user_ids, surface, as_of, model)

    def _finish(self, conn: psycopg.Connection[Any], user_ids: list[str], k: int, surface: str, context: str,
                as_of: datetime | None, log: bool, variant: Variant | None, model: LoadedModel | None,
                scored: dict[str, _Scored], send_features: bool = False) -> list[dict[str, Any]]:
        params = [{"user_id": uid, "surface": surface, "k": k, **_list_params(scored[uid], send_features),
                   "context": context,
                   "as_of": as_of, "policy_set": variant.policy_set if variant else None,
                   "model_version": model.version if model else None, "variant": variant.name if variant else None,
                   "experiment": getattr(variant, "experiment", None), "log": log,
                   "async_commit": log and not self.settings.impressions_sync_commit} for uid in user_ids]
        sql = query("serving.finish_request")
        if len(params) == 1:
            row = conn.execute(sql, params[0]).fetchone()
            return [_json(row[0] if row else None)]
        with conn.pipeline():
            curs = [conn.execute(sql, p) for p in params]
        return [_json(row[0] if (row := c.fetchone()) else None) for c in curs]

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self.pool.connection() as conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    raise _translate(exc) from exc
        except PoolTimeout as exc:
            raise Unavailable(f"no database connection within {self.settings.pool_timeout_s}s") from exc
        except psycopg.OperationalError as exc:
            raise Unavailable(f"database unavailable: {exc}") from exc


def _candidate_rows(conn: psycopg.Connection[Any], user_ids: list[str], surface: str, as_of: datetime | None,
                    model: LoadedModel | None) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """Stage 1 (+ the features when a ranker scores them): the serving count of candidates per user."""
    name = "serving.candidate_features_many" if model is not None else "serving.candidates_many"
    # binary results: ~200 rows x ~50 float8 columns decode in a quarter of the client CPU of text
    cur = conn.execute(query(name), {"user_ids": user_ids, "surface": surface, "as_of": as_of}, binary=True)
    rows = cur.fetchall()
    cols = {d.name: i for i, d in enumerate(cur.description or ())}
    return rows, cols


def scored_candidates(conn: psycopg.Connection[Any], user_id: str, surface: str = "default",
                      as_of: datetime | None = None) -> tuple[list[int], list[float], list[str], int | None]:
    """Stages 1-2 for one user as the Python path serves them: the serving count of candidates scored by the
    active ranker (or ``pgrec.fallback_score`` without one), best first. Returns item keys, scores, each item's
    sources (comma-separated) and the ranker version. ``pgrec policy explain`` re-ranks exactly this list."""
    from engine.ranking.registry import RANKER, active_version

    version = active_version(conn, RANKER)
    model = load(conn, version) if version is not None else None
    rows, cols = _candidate_rows(conn, [user_id], surface, as_of, model)
    s = _rank(rows, cols, [user_id], model)[user_id]
    return s.item_keys, s.scores, s.sources, version


def _rank(rows: list[tuple[Any, ...]], cols: dict[str, int], user_ids: list[str],
          model: LoadedModel | None) -> dict[str, _Scored]:
    """Stage 2: score every candidate (the model's raw score, or pgrec.fallback_score), best first."""
    x = None
    if model is not None and rows:
        missing = [f for f in model.features if f not in cols]
        if missing:
            raise Unavailable(f"ranker version {model.version} needs features {missing} that "
                              "pgrec.candidate_features does not return")
        pick = itemgetter(*(cols[f] for f in model.features))
        x = np.array(list(map(pick, rows)), dtype=np.float64).reshape(len(rows), -1)  # NULL -> NaN = missing
        scores = np.asarray(model.booster.predict(x, raw_score=True, num_threads=1), dtype=np.float64).tolist()
    else:
        scores = [float(r[cols["fallback_score"]]) for r in rows] if rows else []
    ui, ik, src = cols.get("request_user_id"), cols["item_key"], cols["source_list"]
    per_user: dict[str, list[tuple[float, int, str, int]]] = {u: [] for u in user_ids}
    for n, (r, s) in enumerate(zip(rows, scores, strict=True)):
        per_user[r[ui] if ui is not None else user_ids[0]].append((s, int(r[ik]), r[src], n))
    out = {}
    for uid, lst in per_user.items():
        lst.sort(key=lambda t: (-t[0], t[1]))  # the SQL path orders the same way
        fx = x[[t[3] for t in lst]] if x is not None and model is not None else None  # the rows as scored
        out[uid] = _Scored([t[1] for t in lst], [t[0] for t in lst], [t[2] for t in lst], fx,
                           model.features if fx is not None and model is not None else ())
    return out


def _list_params(s: _Scored, features: bool) -> dict[str, Any]:
    """A scored list as the finish_request statement takes it: array literals of the keys and scores (repr of a
    float reads back as the same float8), a JSON array of the source lists and, with ``features`` (a logged list
    whose rows are stored) and a ranker's scores, the feature rows it scored (binary) with their names."""
    send = features and s.features is not None and len(s.item_keys) > 0
    return {"item_keys": "{" + ",".join(map(str, s.item_keys)) + "}",
            "scores": "{" + ",".join(map(repr, s.scores)) + "}",
            "sources": json.dumps(s.sources),
            "feature_names": list(s.feature_names) if send else None,
            "features": FeatureMatrix(s.features) if send and s.features is not None else None}


def _json(v: Any) -> dict[str, Any]:
    if v is None:
        raise Unavailable("pgrec.finish_request returned nothing")
    return v if isinstance(v, dict) else dict(json.loads(v))


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise InvalidRequest(f"k must be an integer between 1 and {MAX_K}, got {k!r}")


def _check_id(what: str, value: Any) -> None:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidRequest(f"{what} ({value!r}) must be a non-empty string of at most 256 characters")
    if "\x00" in value:
        raise InvalidRequest(f"{what} ({value!r}) contains a NUL character, which PostgreSQL text cannot hold")


def _id_list(user_ids: Any) -> list[Any]:
    """The ids of ``recommend_many`` as a list, in order: any ordered collection (a list, a tuple, a numpy array, a
    pandas Series, a generator), never one string or an unordered set."""
    if isinstance(user_ids, (str, bytes)):
        raise InvalidRequest(f"user_ids must be a list of user ids, not one {type(user_ids).__name__} ({user_ids!r})")
    if isinstance(user_ids, (AbstractSet, Mapping)) or not isinstance(user_ids, Iterable):
        raise InvalidRequest(f"user_ids must be an ordered collection of user ids (a list), got "
                             f"{type(user_ids).__name__}")
    return list(user_ids)


def _check_as_of(as_of: Any) -> None:
    if as_of is None:
        return
    if not isinstance(as_of, datetime):
        raise InvalidRequest(f"as_of must be a datetime (timezone-aware), got {type(as_of).__name__} {as_of!r}")
    if as_of.tzinfo is None:
        raise InvalidRequest("as_of must be timezone-aware (for example 2024-01-01T00:00:00+00:00)")


def _check(user_ids: Sequence[str], k: int, surface: str, context: dict[str, Any] | None,
           as_of: datetime | None) -> str:
    _check_k(k)
    for n, uid in enumerate(user_ids):
        _check_id(f"user_id #{n + 1}", uid)
    if not isinstance(surface, str) or not surface or "\x00" in surface:
        raise InvalidRequest(f"surface must be a non-empty string without NUL characters, got {surface!r}")
    if context is not None and not isinstance(context, dict):
        raise InvalidRequest(f"context must be a JSON object (dict), got {type(context).__name__}")
    _check_as_of(as_of)
    try:
        return json.dumps(context or {})
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"context is not JSON-serialisable: {exc}") from exc


def _translate(exc: psycopg.Error) -> Exception:
    """SQL errors to the public ones: 22023 (bad parameter) -> InvalidRequest, P0002 (unknown id) -> NotFound."""
    msg = (exc.diag.message_primary if exc.diag else None) or str(exc)
    if exc.sqlstate in ("22023", "22P02", "22007", "22008", "22P05", "22021"):
        return InvalidRequest(msg)
    if exc.sqlstate == "P0002":
        return NotFound(msg)
    if isinstance(exc, psycopg.OperationalError) or exc.sqlstate in ("57014", "57P01", "08006", "08003"):
        return Unavailable(msg)
    return exc
