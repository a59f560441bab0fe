"""Item-to-item co-occurrence: the neighbours table behind the history candidate source.

Two positive events of one user form a pair when they are at most ``max_gap`` of the user's positive items
and ``window_hours`` apart (each user counts an item once, at its first positive event). Pairs are counted
in both directions; an item's neighbours are the ``top_n`` items with the highest cosine
``count(a, b) / sqrt(users(a) * users(b))`` among pairs seen at least ``min_count`` times, which keeps
popular items from being everyone's neighbour.

A full build recounts from scratch and stores only the pairs seen at least ``min_count`` times (the others
cannot be neighbours, and they are most pairs: 92% of the 21M pairs of 2M generated events). An incremental
build adds the pairs whose later event falls in [previous as_of, as_of) to the stored counts, keeps every new
pair, and recomputes the neighbours of the items those pairs touch. So a stored count is exact for a pair that
was kept by the last full build or first seen after it; a pair the last full build left out (seen fewer than
``min_count`` times then) counts again from zero, so its count is short by at most ``min_count - 1`` until the
next full build. Incremental builds also assume events arrive roughly in time order: an event older than the
previous build's as_of is only counted by a full build.
``as_of`` (default: now) makes a build from the past only, for evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from engine.errors import InvalidRequest
from engine.sql import query


@dataclass(frozen=True)
class CooccurrenceConfig:
    """Build parameters; ``None`` fields take their value from pgrec.config (cooccurrence_*)."""

    window_hours: float | None = None  # default 168: pairs within a week
    max_gap: int | None = None         # default 20: at most 20 positive items apart
    top_n: int | None = None           # default 50 neighbours per item
    min_count: int | None = None       # default 2: pairs seen once are noise


@dataclass(frozen=True)
class BuildResult:
    build_id: int
    mode: str
    as_of: datetime
    since: datetime | None
    pairs: int
    items: int
    seconds: float


Progress = Callable[[int, int], None]  # (done, total) user batches


def _resolve(conn: psycopg.Connection[Any], config: CooccurrenceConfig) -> dict[str, float]:
    stored = {k.removeprefix("cooccurrence_"): v for k, v in conn.execute(query("candidates.cooc_config")).fetchall()}
    defaults = {"window_hours": 168.0, "max_gap": 20.0, "top_n": 50.0, "min_count": 2.0}
    out: dict[str, float] = {}
    for name, default in defaults.items():
        given = getattr(config, name)
        value = float(given) if given is not None else float(stored.get(name, default))
        if value <= 0:
            raise InvalidRequest(f"cooccurrence {name} must be > 0, got {value}")
        out[name] = value
    return out


def build(conn: psycopg.Connection[Any], *, as_of: datetime | None = None, incremental: bool = False,
          config: CooccurrenceConfig | None = None, batches: int = 20,
          progress: Progress | None = None) -> BuildResult:
    """Build (full) or update (incremental) pgrec.item_neighbors in one transaction; returns what was built.

    An incremental build needs a previous build with the same window, gap, top_n and min_count and an earlier
    as_of; when there is none it raises :class:`InvalidRequest` (run a full build). It counts only the new
    events' pairs, then scores again the lists of every item with new pairs or a new user count and of every
    item paired with one (their scores divide by its user count), so its lists equal a full rebuild's but for
    pairs a full build left out for being seen fewer than min_count times (counted from zero after it). What it
    saves is the pair count over the old events: on a busy catalog the rescored lists are most of them (6 hours
    of events on 20k items touched 93% in a review's measurement).
    """
    started = datetime.now(UTC)
    params = _resolve(conn, config or CooccurrenceConfig())
    as_of = as_of or datetime.now(UTC)
    since: datetime | None = None
    if incremental:
        last = conn.execute(query("candidates.cooc_last_build")).fetchone()
        if last is None:
            raise InvalidRequest("no previous co-occurrence build to update: run a full build first")
        _, since, last_params = last
        # the lists must be scored as the earlier build scored them: the same window, gap, list length and count
        for key in ("window_hours", "max_gap", "top_n", "min_count"):
            if float(last_params.get(key, -1)) != params[key]:
                raise InvalidRequest(
                    f"incremental build with {key}={params[key]:g} but the last build used "
                    f"{last_params.get(key)}: run a full build")
        if since is None or as_of <= since:
            raise InvalidRequest(f"incremental build as of {as_of.isoformat()} is not after the last build "
                                 f"({since.isoformat() if since else '-'})")
    mode = "incremental" if incremental else "full"
    with conn.transaction():
        build_id = conn.execute(query("candidates.cooc_start_build"),
                                {"mode": mode, "as_of": as_of, "params": json.dumps(params)}).fetchone()[0]  # type: ignore[index]
        if not incremental:
            conn.execute(query("candidates.cooc_reset"))
        conn.execute(query("candidates.cooc_drop_temp"))
        conn.execute(query("candidates.cooc_stage"), {"as_of": as_of, "since": since})
        conn.execute(query("candidates.cooc_stage_index"))
        conn.execute("ANALYZE cooc_ev")
        conn.execute(query("candidates.cooc_touched"))
        conn.execute(query("candidates.cooc_items"), {"since": since})
        users = [int(r[0]) for r in conn.execute(query("candidates.cooc_users")).fetchall()]
        chunks = _chunks(users, batches)
        window = timedelta(hours=params["window_hours"])
        conn.execute(query("candidates.cooc_new"))
        for done, (lo, hi) in enumerate(chunks, start=1):
            conn.execute(query("candidates.cooc_pairs"), {"gap": int(params["max_gap"]), "window": window,
                                                          "lo": lo, "hi": hi, "since": since})
            if progress:
                progress(done, len(chunks))
        if incremental:
            conn.execute(query("candidates.cooc_merge"))
            conn.execute(query("candidates.cooc_touch_partners"))
        else:
            conn.execute(query("candidates.cooc_merge_full"), {"min_count": params["min_count"]})
        conn.execute(query("candidates.cooc_clear_neighbors"))
        conn.execute(query("candidates.cooc_neighbors"),
                     {"min_count": params["min_count"], "top_n": int(params["top_n"])})
        pairs, items = conn.execute(query("candidates.cooc_finish_build"), {"build_id": build_id}).fetchone()  # type: ignore[misc]
    return BuildResult(int(build_id), mode, as_of, since, int(pairs or 0), int(items or 0),
                       (datetime.now(UTC) - started).total_seconds())


def _chunks(keys: list[int], batches: int) -> list[tuple[int, int]]:
    """Split sorted user keys into at most ``batches`` contiguous (lo, hi) ranges."""
    if not keys:
        return []
    size = max(1, -(-len(keys) // max(1, batches)))
    return [(keys[i], keys[min(i + size, len(keys)) - 1]) for i in range(0, len(keys), size)]


def describe(result: BuildResult) -> dict[str, Any]:
    out = asdict(result)
    out["as_of"] = result.as_of.isoformat()
    out["since"] = result.since.isoformat() if result.since else None
    return out
