"""Stored item-embedding neighbours: each item's k nearest items, precomputed for the history source.

The history source adds the embedding neighbours of a user's most recent positive items. Searching the HNSW
index for each of them on every request costs milliseconds per seed item at 1M items; reading a stored list is
one index range scan. ``build`` stores the lists (``pgrec.model_neighbors``, model ``'embedding'``) in batches,
one transaction each; a list counts only while it is newer than its item's vector (``built_at >=
item_embeddings.updated_at``), so a seed whose vector changed since is searched live, never served stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from engine.errors import InvalidRequest
from engine.sql import query

BATCH = 2_000
K = 20  # neighbours stored per item


@dataclass(frozen=True)
class NeighborsResult:
    items: int
    rows: int
    seconds: float


def build(conn: psycopg.Connection[Any], *, k: int = K, stale_only: bool = False,
          progress: Callable[[int, int], None] | None = None) -> NeighborsResult:
    """Store the ``k`` nearest items of every item with a vector (or only of those without a current list)."""
    if not 1 <= k <= 500:
        raise InvalidRequest(f"k must be between 1 and 500, got {k}")
    started = time.perf_counter()
    keys = [int(r[0]) for r in conn.execute(query("candidates.emb_neighbor_items"), {"stale_only": stale_only})]
    rows = 0
    for start in range(0, len(keys), BATCH):
        batch = keys[start:start + BATCH]
        with conn.transaction(), conn.cursor() as cur:
            rows += refresh(cur, batch, k)
        if progress is not None:
            progress(start + len(batch), len(keys))
    return NeighborsResult(items=len(keys), rows=rows, seconds=time.perf_counter() - started)


def refresh(cur: psycopg.Cursor[Any], item_keys: list[int], k: int = K) -> int:
    """Store the lists of these items in the cursor's transaction. Returns the rows written."""
    row = cur.execute(query("candidates.emb_neighbor_refresh"), {"item_keys": item_keys, "k": k}).fetchone()
    return int(row[0]) if row else 0


def ensure_current(conn: psycopg.Connection[Any]) -> Iterator[str]:
    """Build the lists that are missing or stale, as a deployment keeps them (the benchmarks call this first)."""
    t0 = time.perf_counter()
    r = build(conn, stale_only=True)
    if r.items:
        yield f"embedding neighbours: {r.items:,} items ({r.rows:,} rows) in {time.perf_counter() - t0:.0f}s"
