"""Stage 1, candidate generation: from the whole catalog to a few hundred items per request, in SQL.

The work happens in ``sql/candidates/`` (each function's live definition is in the highest ``vN.sql`` that has
it); this module calls it by name. Five sources, each one SQL
function ``pgrec.source_<name>(user_key, k, as_of, categories, params)`` returning rows
``(item_key, source, score, rank)``:

- ``ann``: the user vector (``pgrec.user_vector``: the latest positive events' item vectors, weighted by event
  weight and recency, so the next request follows a new event, plus the retrieval model's vectors of the
  user's properties, so a user with no events has one too; a stored vector from the retrieval model serves
  until a positive event dated at or after its ``based_on`` arrives: one recorded later but dated before it
  does not move it until the next training) against the HNSW index of item embeddings,
  available items only. ``hnsw.ef_search`` (raised to the LIMIT, at most 1000), ``iterative_scan`` and
  ``max_scan_tuples`` come from the source's params. With a category filter the function counts the matching
  items first (GIN index, capped): at most ``exact_max_rows`` -> an exact distance sort of those rows; more ->
  the iterative index scan with ``max_scan_tuples`` raised to about ``2 * k / selectivity``, so a selective
  filter still returns min(k, matching) rows.
- ``history``: co-occurrence neighbours (``pgrec.item_neighbors``, built by :mod:`engine.cooccurrence`) of the
  user's recent positive items plus item-embedding neighbours of the newest few, recency weighted.
- ``trending``: time-decayed popularity in the user's segment (user property named by config
  ``segment_property``) plus a share of the global one. A statement-level trigger on ``pgrec.events`` keeps
  running decayed sums (new events count at once; ranking is one index scan); for ``as_of`` in the past the
  positive events of the last 10 half-lives before it are recounted. The two agree but for events older than
  10 half-lives (left out of the recount) and events dated after now (accepted up to a day ahead for clock
  skew: the running sums count them at their stated time, above their weight until then). The shared lists
  (trending, popular) are cached for ``source_cache_seconds`` (30), at a past as_of too: an event backfilled
  before that as_of shows in them once the entry expires.
- ``fresh``: items created in the last ``fresh_days``, ranked by early engagement.
- ``popular``: long half-life popularity; the fallback for cold users.

The union ``pgrec.candidates(user_id, surface, n, as_of, categories)`` reads ``pgrec.candidate_sources``
(per surface: enabled sources, quota = share of n, params, fallback order) and returns one row per item with
every source's score and rank.
The database checks each source's ``params`` when a row is written (``sql/sources/v1.sql``: the known keys,
their types, ranges and defaults are ``pgrec.source_param_specs()``, listed in docs/contracts.md);
``pgrec sources list|set|params`` edits and shows the rows.

Over-fetch: ``n`` counts items the user has *not* interacted with before ``as_of``. Let ``s`` = the number of
distinct items the user has seen, capped by config ``candidates_overfetch_max`` (100). Each source fetches
``ceil(quota * n) + s`` rows, so its quota is met with unseen items even if every seen item ranks at its top
(for users with more seen items than the cap, a quota can fall short and the fill makes up the difference); a
fallback source fetches ``n`` plus as many rows as the user has seen items, up to ``4n`` (or the cap, if larger),
so the fill reaches n unseen items while the catalog has them, unless more than that many seen items rank at the
top of the fallback (a very heavy user: fewer than n then). The union takes each source's quota of unseen items, then fills up to n
unseen items from the fallback sources in order (then any other rows found). Seen items a source ranked within
its share are returned too; excluding them (the "exclude seen" policy of stage 3) leaves n candidates.

n is the least number of unseen rows, not an exact count: each source's quota is rounded up (``ceil(quota *
n)``), so a small n returns a few more (n = 1 with five sources: up to five), and a surface whose quotas sum
above 1 returns up to that many times n (nothing checks the sum). A surface whose sources are all disabled
(or whose fallbacks are) returns what the others find, possibly nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import psycopg

from engine.errors import InvalidRequest, NotFound
from engine.sql import query

SOURCES: tuple[str, ...] = ("ann", "history", "trending", "fresh", "popular")


@dataclass(frozen=True)
class Candidate:
    """One row of ``pgrec.candidates`` (NULL score/rank where a source did not find the item)."""

    item_key: int
    item_id: str
    sources: list[str]
    ann_score: float | None = None
    ann_rank: int | None = None
    history_score: float | None = None
    history_rank: int | None = None
    trending_score: float | None = None
    trending_rank: int | None = None
    fresh_score: float | None = None
    fresh_rank: int | None = None
    popular_score: float | None = None
    popular_rank: int | None = None

    def rank(self, source: str) -> int | None:
        value: int | None = getattr(self, f"{source}_rank")
        return value

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SourceRow:
    item_key: int
    score: float
    rank: int


def _check(n: int) -> None:
    if not 1 <= n <= 10_000:
        raise InvalidRequest(f"n must be between 1 and 10000, got {n}")


def candidates(conn: psycopg.Connection[Any], user_id: str, *, n: int = 500, surface: str = "default",
               as_of: datetime | None = None, categories: list[str] | None = None) -> list[Candidate]:
    """Stage-1 candidates for a user id (an unknown id is a cold user), best first."""
    _check(n)
    rows = conn.execute(query("candidates.candidates"), {"user_id": user_id, "surface": surface, "n": n,
                                                         "as_of": as_of, "categories": categories}).fetchall()
    return [Candidate(*r) for r in rows]


def candidates_by_key(conn: psycopg.Connection[Any], user_key: int | None, *, n: int = 500,
                      surface: str = "default", as_of: datetime | None = None,
                      categories: list[str] | None = None) -> list[Candidate]:
    """The same by internal user key (None = a cold user)."""
    _check(n)
    rows = conn.execute(query("candidates.candidates_by_key"), {"user_key": user_key, "surface": surface, "n": n,
                                                                "as_of": as_of, "categories": categories}).fetchall()
    return [Candidate(*r) for r in rows]


def source_params(conn: psycopg.Connection[Any], surface: str = "default") -> dict[str, dict[str, Any]]:
    """The surface's rows of pgrec.candidate_sources (the 'default' rows when it has none), by source."""
    rows = conn.execute(query("candidates.source_params"), {"surface": surface}).fetchall()
    return {r[0]: {"enabled": r[1], "quota": r[2], "fallback_order": r[3], "params": r[4]} for r in rows}


def run_source(conn: psycopg.Connection[Any], source: str, user_key: int | None, k: int, *,
               as_of: datetime | None = None, categories: list[str] | None = None,
               params: dict[str, Any] | None = None) -> list[SourceRow]:
    """One source alone, top ``k`` (params default to the 'default' surface's)."""
    if source not in SOURCES:
        raise InvalidRequest(f"unknown candidate source {source!r}: one of {', '.join(SOURCES)}")
    if params is None:
        params = source_params(conn).get(source, {}).get("params", {})
    rows = conn.execute(query("candidates.source_rows"),
                        {"source": source, "user_key": user_key, "k": k, "as_of": as_of,
                         "categories": categories, "params": json.dumps(params)}).fetchall()
    return [SourceRow(int(r[0]), float(r[2]), int(r[3])) for r in rows]


def user_key(conn: psycopg.Connection[Any], user_id: str) -> int | None:
    row = conn.execute(query("candidates.user_key"), {"user_id": user_id}).fetchone()
    return None if row is None else int(row[0])


def similar(conn: psycopg.Connection[Any], item_id: str, k: int = 20) -> list[tuple[str, float, float | None, float | None]]:
    """Items like ``item_id``: (item_id, score, co-occurrence score, embedding similarity). NotFound if unknown."""
    if not 1 <= k <= 1000:
        raise InvalidRequest(f"k must be between 1 and 1000, got {k}")
    try:
        rows = conn.execute(query("candidates.similar"), {"item_id": item_id, "k": k}).fetchall()
    except psycopg.errors.NoDataFound:
        raise NotFound(f"unknown item {item_id!r}") from None
    return [(r[0], float(r[1]), r[2], r[3]) for r in rows]


def trending(conn: psycopg.Connection[Any], k: int = 20, segment: str | None = None,
             as_of: datetime | None = None) -> list[tuple[str, float]]:
    """Trending items, globally or in one segment."""
    if not 1 <= k <= 1000:
        raise InvalidRequest(f"k must be between 1 and 1000, got {k}")
    rows = conn.execute(query("candidates.trending"), {"segment": segment, "k": k, "as_of": as_of}).fetchall()
    return [(r[0], float(r[1])) for r in rows]
