"""Data to work with: MovieLens as distributed, and a synthetic generator with planted structure.

Both produce records in the generic import format (see README) and load through ``engine.ingest``, so a
dataset takes the same validated path as a user's file.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from engine import ingest

# ---------------------------------------------------------------- MovieLens

_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def _title_year(title: str) -> dict[str, Any]:
    m = _TITLE_YEAR.match(title.strip())
    if m:
        return {"title": m.group(1), "year": int(m.group(2))}
    return {"title": title.strip()}


@dataclass
class MovieLens:
    """One MovieLens release read into generic records. Items get ``created_at`` = their first rating
    (MovieLens has no release timestamps per catalog entry), so items first rated after a split are cold."""

    name: str
    items: list[dict[str, Any]]
    users: list[dict[str, Any]]
    events: list[dict[str, Any]]


def read_movielens(path: Path) -> MovieLens:
    """Read MovieLens 100K (u.data), 1M (ratings.dat) or latest(-small) (ratings.csv) from ``path``."""
    if (path / "u.data").is_file():
        return _ml100k(path)
    if (path / "ratings.dat").is_file():
        return _ml1m(path)
    if (path / "ratings.csv").is_file():
        return _mllatest(path)
    raise FileNotFoundError(f"{path}: no MovieLens files (u.data, ratings.dat or ratings.csv)")


def _finish(name: str, items: dict[str, dict[str, Any]], users: dict[str, dict[str, Any]],
            ratings: list[tuple[str, str, float, int]]) -> MovieLens:
    first: dict[str, int] = {}
    for _, i, _, ts in ratings:
        if i not in first or ts < first[i]:
            first[i] = ts
    item_list = []
    for iid, it in items.items():
        if iid in first:
            it["created_at"] = datetime.fromtimestamp(first[iid], tz=UTC).isoformat()
        else:
            continue  # never rated: nothing to learn or evaluate
        item_list.append(it)
    events = [
        {"user_id": u, "item_id": i, "event_type": "rating", "value": r,
         "occurred_at": datetime.fromtimestamp(ts, tz=UTC).isoformat()}
        for u, i, r, ts in ratings if i in items
    ]
    for u, _, _, _ in ratings:
        users.setdefault(u, {"user_id": u})
    return MovieLens(name, item_list, list(users.values()), events)


def _ml100k(path: Path) -> MovieLens:
    genres = [line.split("|")[0] for line in (path / "u.genre").read_text(encoding="latin-1").splitlines() if line]
    items: dict[str, dict[str, Any]] = {}
    for line in (path / "u.item").read_text(encoding="latin-1").splitlines():
        if not line:
            continue
        f = line.split("|")
        cats = [g for g, flag in zip(genres, f[5:], strict=False) if flag == "1" and g != "unknown"]
        items[f[0]] = {"item_id": f[0], "categories": cats, "properties": _title_year(f[1])}
    users: dict[str, dict[str, Any]] = {}
    for line in (path / "u.user").read_text(encoding="latin-1").splitlines():
        if line:
            u, age, gender, occ, z = line.split("|")
            users[u] = {"user_id": u, "properties": {"age": int(age), "gender": gender, "occupation": occ, "zip": z}}
    ratings = []
    for line in (path / "u.data").read_text().splitlines():
        if line:
            u, i, r, ts = line.split("\t")
            ratings.append((u, i, float(r), int(ts)))
    return _finish("ml-100k", items, users, ratings)


def _ml1m(path: Path) -> MovieLens:
    items: dict[str, dict[str, Any]] = {}
    for line in (path / "movies.dat").read_text(encoding="latin-1").splitlines():
        if line:
            i, title, g = line.split("::")
            items[i] = {"item_id": i, "categories": [c for c in g.split("|") if c], "properties": _title_year(title)}
    users: dict[str, dict[str, Any]] = {}
    if (path / "users.dat").is_file():
        for line in (path / "users.dat").read_text(encoding="latin-1").splitlines():
            if line:
                u, gender, age, occ, z = line.split("::")
                users[u] = {"user_id": u,
                            "properties": {"gender": gender, "age": int(age), "occupation": occ, "zip": z}}
    ratings = []
    for line in (path / "ratings.dat").read_text().splitlines():
        if line:
            u, i, r, ts = line.split("::")
            ratings.append((u, i, float(r), int(ts)))
    return _finish("ml-1m", items, users, ratings)


def _mllatest(path: Path) -> MovieLens:
    items: dict[str, dict[str, Any]] = {}
    with (path / "movies.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            cats = [c for c in row["genres"].split("|") if c and c != "(no genres listed)"]
            items[row["movieId"]] = {"item_id": row["movieId"], "categories": cats,
                                     "properties": _title_year(row["title"])}
    if (path / "tags.csv").is_file():
        with (path / "tags.csv").open(encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                it = items.get(row["movieId"])
                if it is not None:
                    tags = it["properties"].setdefault("tags", [])
                    tag = row["tag"].strip().lower()
                    if tag and tag not in tags:
                        tags.append(tag)
    ratings = []
    with (path / "ratings.csv").open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            ratings.append((row["userId"], row["movieId"], float(row["rating"]), int(row["timestamp"])))
    return _finish(path.name, items, {}, ratings)


def load_movielens(conn: psycopg.Connection[Any], path: Path, *, positive_min: float = 4.0,
                   negative_max: float = 2.0) -> dict[str, ingest.ImportResult]:
    """Import a MovieLens folder: genres -> categories, title/year -> properties, ratings -> ``rating`` events.

    Ratings >= positive_min are positive and <= negative_max negative (stored on the ``rating`` event type).
    """
    if negative_max >= positive_min:
        raise ValueError("negative_max must be below positive_min")
    ml = read_movielens(path)
    conn.execute("UPDATE pgrec.event_types SET positive_min = %s, negative_max = %s WHERE name = 'rating'",
                 (positive_min, negative_max))
    return _load(conn, ml.items, ml.users, ml.events, ml.name)


def _load(conn: psycopg.Connection[Any], items: list[dict[str, Any]], users: list[dict[str, Any]],
          events: list[dict[str, Any]], source: str) -> dict[str, ingest.ImportResult]:
    out = {}
    for kind, rows in (("items", items), ("users", users), ("events", events)):
        out[kind] = ingest.import_records(conn, kind, enumerate(rows, start=1), source=f"{source}:{kind}")
    return out


# ---------------------------------------------------------------- synthetic data

CATEGORIES = ("action", "comedy", "drama", "documentary", "kids", "music", "sports", "news", "science",
              "travel", "food", "horror")
COUNTRIES = ("us", "de", "fr", "jp", "br")


@dataclass(frozen=True)
class GeneratorConfig:
    """Knobs of the synthetic world. Defaults make a small catalog that trains in seconds."""

    users: int = 2_000
    items: int = 1_000
    events: int = 60_000
    clusters: int = 8          # taste clusters; each prefers a couple of categories
    days: int = 120            # length of the event window, ending now
    dim: int = 64              # dimension of the "true" item vectors written as embeddings
    dislike_rate: float = 0.04
    local_hit_boost: float = 8.0  # per-country hits are this much more popular in their country
    seed: int = 7


@dataclass
class Synthetic:
    config: GeneratorConfig
    items: list[dict[str, Any]]
    users: list[dict[str, Any]]
    events: list[dict[str, Any]]
    item_vectors: np.ndarray      # (items, dim), the planted taste space
    user_cluster: np.ndarray      # (users,) planted cluster per user
    item_cluster: np.ndarray      # (items,) planted cluster per item

    def write(self, out: Path) -> dict[str, Path]:
        """Write items.csv, users.jsonl, events.csv and item_embeddings.npy (+ .ids.txt) into ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        paths = {"items": out / "items.csv", "users": out / "users.jsonl", "events": out / "events.csv",
                 "embeddings": out / "item_embeddings.npy"}
        with paths["items"].open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["item_id", "categories", "created_at", "properties"])
            for it in self.items:
                w.writerow([it["item_id"], "|".join(it["categories"]), it["created_at"], json.dumps(it["properties"])])
        with paths["users"].open("w") as fh:
            for u in self.users:
                fh.write(json.dumps(u) + "\n")
        with paths["events"].open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["event_id", "user_id", "item_id", "event_type", "occurred_at", "value"])
            for e in self.events:
                w.writerow([e["event_id"], e["user_id"], e["item_id"], e["event_type"], e["occurred_at"], ""])
        np.save(paths["embeddings"], self.item_vectors.astype(np.float32))
        (out / "item_embeddings.ids.txt").write_text("\n".join(it["item_id"] for it in self.items) + "\n")
        return paths

    def load(self, conn: psycopg.Connection[Any], *, embeddings: bool = True) -> dict[str, ingest.ImportResult]:
        """Import everything into the database; optionally the planted vectors as item embeddings."""
        out = _load(conn, self.items, self.users, self.events, "synthetic")
        if embeddings:
            dim = int(conn.execute("SELECT value::int FROM pgrec.config WHERE key = 'embedding_dim'").fetchone()[0])  # type: ignore[index]
            vecs = _fit_dim(self.item_vectors, dim)
            rows = ((n, it["item_id"], vecs[n - 1].tolist()) for n, it in enumerate(self.items, start=1))
            ingest.import_embeddings(conn, "items", rows, model_version="synthetic", source="synthetic")
        return out


def _fit_dim(v: np.ndarray, dim: int) -> np.ndarray:
    if v.shape[1] >= dim:
        return v[:, :dim]
    return np.hstack([v, np.zeros((v.shape[0], dim - v.shape[1]), dtype=v.dtype)])


def generate(config: GeneratorConfig | None = None, *, now: datetime | None = None) -> Synthetic:
    """A world with taste clusters, power-law activity and popularity, catalog growth, local hits and dislikes.

    Deterministic for ``config.seed`` and ``now``.
    """
    c = config or GeneratorConfig()
    rng = np.random.default_rng(c.seed)
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    start = now - timedelta(days=c.days)
    n_cat = len(CATEGORIES)

    # clusters: a centroid in taste space and a preference over categories
    centroids = rng.normal(size=(c.clusters, c.dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    cluster_cats = np.stack([rng.choice(n_cat, size=2, replace=False) for _ in range(c.clusters)])

    # items: a cluster, categories from it (plus sometimes a random one), a vector near the centroid
    item_cluster = rng.integers(0, c.clusters, size=c.items)
    vecs = centroids[item_cluster] + 0.35 * rng.normal(size=(c.items, c.dim))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    # catalog growth: 70% exist before the window, the rest arrive during it (more later)
    created_offset = np.where(
        rng.random(c.items) < 0.7,
        -rng.uniform(0, 365, size=c.items),
        c.days * np.sqrt(rng.random(c.items)),
    )
    created = [start + timedelta(days=float(d)) for d in created_offset]
    popularity = rng.pareto(1.2, size=c.items) + 1.0
    items = []
    for i in range(c.items):
        cats = [CATEGORIES[cluster_cats[item_cluster[i], rng.integers(0, 2)]]]
        if rng.random() < 0.3:
            extra = CATEGORIES[rng.integers(0, n_cat)]
            if extra not in cats:
                cats.append(extra)
        items.append({
            "item_id": f"i{i}",
            "categories": cats,
            "created_at": created[i].isoformat(),
            "properties": {"title": f"Item {i}", "brand": f"b{rng.integers(0, 40)}",
                           "provider": f"p{rng.integers(0, 10)}", "price": round(float(rng.uniform(1, 100)), 2),
                           "age_rating": int(rng.choice([0, 6, 12, 16, 18]))},
        })

    # users: a cluster, a country, power-law activity
    user_cluster = rng.integers(0, c.clusters, size=c.users)
    country = rng.choice(len(COUNTRIES), size=c.users, p=[0.4, 0.2, 0.15, 0.15, 0.1])
    activity = rng.pareto(1.5, size=c.users) + 1.0
    users = [{"user_id": f"u{u}", "properties": {"country": COUNTRIES[country[u]], "age": int(rng.integers(13, 80))}}
             for u in range(c.users)]
    # local hits: a few items per country that are far more popular there
    local_hits = {k: rng.choice(c.items, size=max(1, c.items // 100), replace=False) for k in range(len(COUNTRIES))}

    ev_user = rng.choice(c.users, size=c.events, p=activity / activity.sum())
    ev_time = np.sort(rng.uniform(0, c.days, size=c.events))
    rng.shuffle(ev_time)  # times independent of user
    own = rng.random(c.events) < 0.85
    dislike = rng.random(c.events) < c.dislike_rate
    kinds = rng.choice(["view", "click", "like", "purchase"], size=c.events, p=[0.6, 0.27, 0.1, 0.03])
    other = (user_cluster[ev_user] + 1 + rng.integers(0, c.clusters - 1, size=c.events)) % c.clusters
    ev_cluster = np.where(dislike, other,
                          np.where(own, user_cluster[ev_user], rng.integers(0, c.clusters, size=c.events)))
    ev_item = np.full(c.events, -1)
    ev_country = country[ev_user]
    for k in range(c.clusters):
        pool = np.flatnonzero(item_cluster == k)
        for g in range(len(COUNTRIES)):
            sel = np.flatnonzero((ev_cluster == k) & (ev_country == g))
            if len(sel) == 0 or len(pool) == 0:
                continue
            w = popularity[pool] * np.where(np.isin(pool, local_hits[g]), c.local_hit_boost, 1.0)
            # items not yet in the catalog at the event's time are drawn again (a few rounds), else dropped
            todo = sel
            for _ in range(6):
                pick = pool[rng.choice(len(pool), size=len(todo), p=w / w.sum())]
                ok = created_offset[pick] <= ev_time[todo]
                ev_item[todo[ok]] = pick[ok]
                todo = todo[~ok]
                if len(todo) == 0:
                    break
    keep = np.flatnonzero(ev_item >= 0)
    events: list[dict[str, Any]] = [
        {"event_id": f"e{e}", "user_id": f"u{ev_user[e]}", "item_id": f"i{ev_item[e]}",
         "event_type": "dislike" if dislike[e] else str(kinds[e]),
         "occurred_at": (start + timedelta(days=float(ev_time[e]))).isoformat()}
        for e in keep
    ]
    return Synthetic(c, items, users, events, vecs, user_cluster, item_cluster)


def iter_events(data: Synthetic) -> Iterator[tuple[int, dict[str, Any]]]:
    return enumerate(data.events, start=1)
