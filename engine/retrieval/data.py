"""Training data for the retrieval model: the event log, the item features and the (history -> item) pairs.

Everything is turned into dense integer indices once (items 0..n-1, users 0..m-1) so that training is
array arithmetic. The history of a pair is exactly what ``pgrec.user_vector`` reads at the event's time: the
user's last ``max_events`` positive events strictly before it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg

from engine.errors import InvalidRequest
from engine.experiments import CITATION_CLOCK_SLACK
from engine.sql import query

Ints = Sequence[int] | np.ndarray
Floats = Sequence[float] | np.ndarray
GLOBAL_TOKEN = "*"  # every item has it, so an item without features or events still gets a vector
EXCLUDED_PROPERTIES = frozenset({"title", "name", "description", "url", "image", "image_url"})


# ---------------------------------------------------------------- item features


def item_tokens(categories: Sequence[str] | None, properties: Mapping[str, Any] | None,
                keys: Sequence[str] | None = None) -> list[str]:
    """The feature tokens of one item: ``cat:<c>`` per category and ``<key>=<value>`` per selected property.

    ``keys`` None selects every property except free text (title, name, description, urls). Strings, ints
    and booleans are tokens as they are; lists give one token per element; other numbers a log2 bucket.
    """
    out = [GLOBAL_TOKEN]
    out += [f"cat:{c}" for c in categories or () if c]
    out += property_tokens(properties, keys)
    return list(dict.fromkeys(out))


def property_tokens(properties: Mapping[str, Any] | None, keys: Sequence[str] | None = None) -> list[str]:
    """``<key>=<value>`` per selected property value (see :func:`item_tokens`), distinct, in key order.
    ``pgrec.property_tokens`` computes the same tokens in SQL (for the user tower)."""
    out: list[str] = []
    for key, value in sorted((properties or {}).items()):
        if (keys is None and key in EXCLUDED_PROPERTIES) or (keys is not None and key not in keys):
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, int) or (isinstance(v, str) and 0 < len(v) <= 64):  # bool is an int
                out.append(f"{key}={str(v).lower()}")
            elif isinstance(v, float) and math.isfinite(v):
                out.append(f"{key}~{math.floor(math.log2(abs(v) + 1.0))}{'-' if v < 0 else ''}")
    return list(dict.fromkeys(out))


def user_tokens(properties: Mapping[str, Any] | None) -> list[str]:
    """The feature tokens of one user for the user tower: every property value but free text."""
    return property_tokens(properties)


@dataclass
class FeatureVocabulary:
    """Token -> row of the feature embedding table. Built on the training catalog, stored with the model."""

    tokens: list[str]
    max_per_item: int = 32

    @classmethod
    def build(cls, per_item: Iterable[Sequence[str]], *, min_count: int = 2, max_per_item: int = 32,
              max_size: int = 20_000) -> FeatureVocabulary:
        counts = Counter(t for toks in per_item for t in toks)
        kept = [t for t, n in counts.items() if n >= min_count or t == GLOBAL_TOKEN]
        kept.sort(key=lambda t: (-counts[t], t))
        return cls(kept[:max_size], max_per_item)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, per_item: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(index, weight) arrays of shape (items, m); weights are 1/sqrt(#known tokens), 0 for padding."""
        index = {t: i for i, t in enumerate(self.tokens)}
        rows = [[index[t] for t in toks if t in index][: self.max_per_item] for toks in per_item]
        m = max(1, max((len(r) for r in rows), default=1))
        fidx = np.zeros((len(rows), m), dtype=np.int64)
        fw = np.zeros((len(rows), m), dtype=np.float64)
        for i, r in enumerate(rows):
            if r:
                fidx[i, : len(r)] = r
                fw[i, : len(r)] = 1.0 / math.sqrt(len(r))
        return fidx, fw


# ---------------------------------------------------------------- the data as read from the database


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Positions of ``keys`` in ``sorted_keys``; -1 where a key is absent."""
    if len(sorted_keys) == 0:
        return np.full(len(keys), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return np.where(sorted_keys[pos] == keys, pos, -1).astype(np.int64)


@dataclass
class RetrievalData:
    """The catalog and the event log (sorted by user, time) before ``as_of``, with dense indices."""

    item_keys: np.ndarray            # (n_items,) int64, sorted
    item_created: np.ndarray         # (n_items,) epoch seconds
    item_tokens: list[list[str]]
    user_keys: np.ndarray            # (n_users,) int64, sorted: users with at least one event
    ev_user: np.ndarray              # (n_events,) index into user_keys
    ev_item: np.ndarray              # (n_events,) index into item_keys
    ev_polarity: np.ndarray          # (n_events,) -1 / 0 / 1
    ev_weight: np.ndarray            # (n_events,) float64
    ev_time: np.ndarray              # (n_events,) epoch seconds
    max_events: int = 50
    half_life_days: float = 30.0
    as_of: datetime | None = None
    ignored_user: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ignored_item: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    user_tokens: list[list[str]] = field(default_factory=list)  # per user index (empty: no user features)

    @property
    def n_items(self) -> int:
        return len(self.item_keys)

    @property
    def n_users(self) -> int:
        return len(self.user_keys)

    def item_index(self, keys: Ints) -> np.ndarray:
        """Dense indices of item keys; InvalidRequest names the first unknown key."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = _lookup(self.item_keys, keys)
        if np.any(pos < 0):
            raise InvalidRequest(f"item_key: unknown item {int(keys[np.flatnonzero(pos < 0)[0]])}")
        return pos

    @classmethod
    def from_arrays(cls, item_keys: Ints, item_tokens: Sequence[Sequence[str]],
                    user: Ints, item: Ints, polarity: Ints, weight: Floats,
                    time: Floats, *, item_created: Floats | None = None,
                    max_events: int = 50, half_life_days: float = 30.0, as_of: datetime | None = None,
                    ignored: tuple[Ints, Ints] | None = None,
                    user_properties: Mapping[int, Mapping[str, Any] | None] | None = None) -> RetrievalData:
        """Build from raw keys. Events are re-sorted by (user, time, input order); they must name known items."""
        ik = np.asarray(item_keys, dtype=np.int64)
        order_items = np.argsort(ik, kind="stable")
        ik = ik[order_items]
        if len(ik) > 1 and np.any(ik[1:] == ik[:-1]):
            raise InvalidRequest("item_keys: duplicate item key")
        tokens = [list(item_tokens[i]) for i in order_items]
        created = (np.zeros(len(ik)) if item_created is None
                   else np.asarray(item_created, dtype=np.float64)[order_items])
        u = np.asarray(user, dtype=np.int64)
        t = np.asarray(time, dtype=np.float64)
        w = np.asarray(weight, dtype=np.float64)
        p = np.asarray(polarity, dtype=np.int64)
        if not (len(u) == len(t) == len(w) == len(p) == len(item)):
            raise InvalidRequest("events: user, item, polarity, weight and time differ in length")
        if len(t) and not (np.all(np.isfinite(t)) and np.all(np.isfinite(w))):
            raise InvalidRequest("events: time and weight must be finite")
        if np.any(w < 0):
            raise InvalidRequest("events: weight must not be negative")
        if np.any((p < -1) | (p > 1)):
            raise InvalidRequest("events: polarity must be -1, 0 or 1")
        order = np.lexsort((np.arange(len(u)), t, u))
        user_keys, ev_user = np.unique(u[order], return_inverse=True)
        data = cls(ik, created, tokens, user_keys.astype(np.int64), ev_user.astype(np.int64),
                   np.zeros(len(u), dtype=np.int64), p[order].astype(np.int8), w[order], t[order],
                   max_events=max_events, half_life_days=half_life_days, as_of=as_of)
        data.ev_item = data.item_index(np.asarray(item, dtype=np.int64)[order])
        if ignored is not None and len(ignored[0]):
            upos = _lookup(data.user_keys, np.asarray(ignored[0], dtype=np.int64))
            ipos = _lookup(data.item_keys, np.asarray(ignored[1], dtype=np.int64))
            keep = (upos >= 0) & (ipos >= 0)  # users without events before as_of have no training pairs
            data.ignored_user, data.ignored_item = upos[keep], ipos[keep]
        props = user_properties or {}
        data.user_tokens = [user_tokens(props.get(int(k))) for k in data.user_keys.tolist()]
        return data


def load(conn: psycopg.Connection[Any], as_of: datetime | None = None, *,
         properties: Sequence[str] | None = None) -> RetrievalData:
    """Read the catalog, the events strictly before ``as_of`` (None: all) and the ignored impressions."""
    settings = conn.execute(query("retrieval.settings")).fetchone()
    assert settings is not None
    _, max_events, half_life = settings
    keys: list[int] = []
    tokens: list[list[str]] = []
    created: list[float] = []
    for key, cats, props, c in conn.execute(query("retrieval.items")):
        keys.append(key)
        tokens.append(item_tokens(cats, props, properties))
        created.append(c)
    params = {"as_of": as_of}
    cur = conn.cursor()
    cur.execute(query("retrieval.events"), params)
    rows = cur.fetchall()
    arr = np.array(rows, dtype=np.float64).reshape(-1, 5)
    ignored_rows = conn.execute(query("retrieval.ignored_impressions"),
                                {**params, "slack": CITATION_CLOCK_SLACK}).fetchall()
    ig = np.array(ignored_rows, dtype=np.int64).reshape(-1, 2)
    user_props = {int(k): p for k, p in conn.execute(query("retrieval.user_properties"))}
    return RetrievalData.from_arrays(
        keys, tokens, arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64),
        arr[:, 3], arr[:, 4], item_created=created, max_events=int(max_events), half_life_days=float(half_life),
        as_of=as_of, ignored=(ig[:, 0], ig[:, 1]), user_properties=user_props,
    )


# ---------------------------------------------------------------- positives, histories, pairs


@dataclass
class Positives:
    """The positive events (sorted by user, time) and, per event, where its history starts and ends."""

    user: np.ndarray
    item: np.ndarray
    weight: np.ndarray
    time: np.ndarray
    block_start: np.ndarray   # first positive of the same user
    hist_end: np.ndarray      # first positive of the same user at the same time (exclusive end of history)

    @classmethod
    def of(cls, data: RetrievalData) -> Positives:
        pos = np.flatnonzero(data.ev_polarity == 1)
        u, t = data.ev_user[pos], data.ev_time[pos]
        n = len(pos)
        idx = np.arange(n)
        new_user = np.ones(n, dtype=bool)
        new_user[1:] = u[1:] != u[:-1]
        new_time = new_user.copy()
        new_time[1:] |= t[1:] != t[:-1]
        block_start = np.maximum.accumulate(np.where(new_user, idx, 0)) if n else idx
        hist_end = np.maximum.accumulate(np.where(new_time, idx, 0)) if n else idx
        return cls(u, data.ev_item[pos], data.ev_weight[pos], t, block_start, hist_end)

    def before(self, users: np.ndarray, t: float) -> np.ndarray:
        """For each user index (sorted ascending), the exclusive end of their positives strictly before t."""
        starts = np.searchsorted(self.user, users, side="left")
        ends = np.searchsorted(self.user, users, side="right")
        out = starts.copy()
        for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
            out[k] = s + np.searchsorted(self.time[s:e], t, side="left")
        return out

    def histories(self, ends: np.ndarray, starts: np.ndarray, max_events: int,
                  half_life_days: float) -> tuple[np.ndarray, np.ndarray]:
        """(items, weights) of shape (len(ends), max_events): the positives in [max(start, end-L), end),
        weighted ``w * 2^(-(t_latest - t) / half_life)``; weight 0 marks padding."""
        lo = ends - max_events
        idx = lo[:, None] + np.arange(max_events)[None, :]
        valid = idx >= np.maximum(starts, lo)[:, None]
        idx = np.clip(idx, 0, max(0, len(self.item) - 1))
        if len(self.item) == 0:
            return np.zeros(idx.shape, dtype=np.int64), np.zeros(idx.shape)
        latest = self.time[np.clip(ends - 1, 0, None)]
        age = latest[:, None] - self.time[idx]
        w = self.weight[idx] * np.exp2(-age / (half_life_days * 86400.0))
        return self.item[idx], np.where(valid, w, 0.0)


def item_frequencies(items: np.ndarray, n_items: int) -> np.ndarray:
    return np.bincount(items, minlength=n_items).astype(np.float64)
