"""The two-tower retrieval model in numpy: towers, the sampled-softmax loss and its gradients.

Item tower: ``v_i = normalise(id_i + sum_f w_if feat_f)`` over the item's feature tokens (categories,
property values and a global token), so an item nobody has touched yet still has a vector from its features.

User tower: the one formula of docs/contracts.md that ``pgrec.user_vector`` computes in SQL,
``u = normalise(sum_h a_h c_h + sum_t g_t / sqrt(T))`` over the user's last positive events with
``a_h = weight * 2^(-age/half_life)``, plus the learned vectors ``g_t`` of the user's T known property tokens
(``ufeats``, stored in ``pgrec.user_feature_embeddings``): a user with no history still has a vector from
their properties, and a heavy user's vector is led by their history.
The context vectors ``c_i = ctx_i + sum_f w_if ctx_feat_f`` are learned (a second id table and feature table)
and stored per item in ``item_embeddings.context_embedding``, so SQL recomputes any user's vector exactly
from stored rows and the user's latest events.

Both id tables and both feature tables live side by side in two parameter arrays of width 2d
(``ids`` and ``feats``: columns [:d] for the item tower, [d:] for the context vectors).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import InvalidRequest

EPS = 1e-12


@dataclass
class Batch:
    """One mini-batch: for each row a history (items, weights) and the positive item; extra negatives shared."""

    hist_items: np.ndarray   # (B, L) item indices
    hist_weights: np.ndarray  # (B, L) weights, 0 for padding
    positives: np.ndarray    # (B,) item indices
    negatives: np.ndarray    # (E,) extra negative item indices (shown but ignored), may be empty
    users: np.ndarray | None = None  # (B,) user indices (rows of the model's uidx/uw); None: no user features


@dataclass
class Gradients:
    rows: np.ndarray     # (S,) item indices whose id rows have a gradient
    ids: np.ndarray      # (S, 2d)
    feats: np.ndarray    # (F, 2d), dense
    ufeats: np.ndarray | None = None  # (G, d), dense: the user feature vectors


class TwoTower:
    """Parameters and the maths. ``fidx``/``fw`` are the items' feature indices and weights (items, m)."""

    def __init__(self, ids: np.ndarray, feats: np.ndarray, fidx: np.ndarray, fw: np.ndarray,
                 ufeats: np.ndarray | None = None, uidx: np.ndarray | None = None,
                 uw: np.ndarray | None = None) -> None:
        self.ids = ids
        self.feats = feats
        self.fidx = fidx
        self.fw = fw
        d = ids.shape[1] // 2
        # user features: (G, d) vectors, and per user index the token rows and weights (users, m)
        self.ufeats = ufeats if ufeats is not None else np.zeros((0, d), dtype=ids.dtype)
        self.uidx = uidx if uidx is not None else np.zeros((0, 1), dtype=np.int64)
        self.uw = uw if uw is not None else np.zeros((0, 1), dtype=ids.dtype)

    @classmethod
    def init(cls, n_items: int, fidx: np.ndarray, fw: np.ndarray, n_features: int, dim: int,
             rng: np.random.Generator, dtype: type = np.float32, uidx: np.ndarray | None = None,
             uw: np.ndarray | None = None, n_user_features: int = 0) -> TwoTower:
        """Id rows start at zero (an item's vector is its features' until its events move it);
        feature rows at random; user feature rows at zero (a user is their history until training says
        otherwise)."""
        ids: np.ndarray = np.zeros((n_items, 2 * dim), dtype=dtype)
        feats = (rng.normal(size=(n_features, 2 * dim)) / np.sqrt(dim)).astype(dtype)
        ufeats: np.ndarray = np.zeros((n_user_features, dim), dtype=dtype)
        return cls(ids, feats, fidx, fw.astype(dtype), ufeats, uidx,
                   uw.astype(dtype) if uw is not None else None)

    def user_feature_sum(self, users: np.ndarray | None) -> np.ndarray | None:
        """(len(users), d): ``sum_t g_t / sqrt(T)`` over each user's known property tokens; None without
        user features (or ``users`` None)."""
        if users is None or len(self.ufeats) == 0 or len(self.uw) == 0:
            return None
        w = self.uw[users]
        pos, k = np.nonzero(w)
        return segment_sum(w[pos, k][:, None] * self.ufeats[self.uidx[users][pos, k]], pos, len(users),
                           ordered=True)

    @property
    def dim(self) -> int:
        return self.ids.shape[1] // 2

    @property
    def n_items(self) -> int:
        return self.ids.shape[0]

    # ------------------------------------------------------------ towers

    def _features(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nonzero feature entries of ``items``: (position in items, feature row, weight), by position."""
        fw = self.fw[items]
        pos, k = np.nonzero(fw)
        return pos, self.fidx[items][pos, k], fw[pos, k]

    def raw(self, items: np.ndarray) -> np.ndarray:
        """(len(items), 2d): unnormalised item-tower output [:d] and context vector [d:]."""
        pos, feat, w = self._features(items)
        return self.ids[items] + segment_sum(w[:, None] * self.feats[feat], pos, len(items), ordered=True)

    def item_vectors(self, items: np.ndarray | None = None) -> np.ndarray:
        """L2-normalised item vectors (what the HNSW index holds)."""
        r = self.raw(np.arange(self.n_items) if items is None else items)[:, : self.dim]
        return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), EPS)

    def context_vectors(self, items: np.ndarray | None = None) -> np.ndarray:
        """Context vectors (an item's contribution to a user vector), as stored in ``context_embedding``."""
        return self.raw(np.arange(self.n_items) if items is None else items)[:, self.dim:]

    # ------------------------------------------------------------ loss

    def loss_and_grad(self, batch: Batch, temperature: float, log_q: np.ndarray | None,
                      need_grad: bool = True, id_dropout: np.ndarray | None = None) -> tuple[float, Gradients | None]:
        """Sampled softmax over the batch's distinct positives and extra negatives (InfoNCE).

        ``logit[b, j] = cos(u_b, v_j) / temperature - log_q[j]`` (the log-Q correction for popularity-biased
        in-batch sampling); the row's label is its own positive. Returns the mean cross-entropy.
        ``id_dropout``: item indices whose id row is left out of their item vector in this batch, so the
        feature part alone learns to place items (what a new item has).
        """
        d = self.dim
        B = len(batch.positives)
        targets, y = np.unique(np.concatenate([batch.positives, batch.negatives]), return_inverse=True)
        y = y[:B]
        hb, hl = np.nonzero(batch.hist_weights)  # history entries that count, ordered by row
        ha = batch.hist_weights[hb, hl].astype(self.ids.dtype)[:, None]
        rows, inv = np.unique(np.concatenate([targets, batch.hist_items[hb, hl]]), return_inverse=True)
        t_inv, h_inv = inv[: len(targets)], inv[len(targets):]
        raw = self.raw(rows)
        r = raw[t_inv, :d]
        dropped = np.isin(targets, id_dropout) if id_dropout is not None else np.zeros(len(targets), dtype=bool)
        if dropped.any():
            r = r - dropped[:, None] * self.ids[targets, :d]
        u_raw = segment_sum(ha * raw[h_inv, d:], hb, B, ordered=True)
        ufs = self.user_feature_sum(batch.users)
        if ufs is not None:
            u_raw = u_raw + ufs
        u_norm = np.maximum(np.linalg.norm(u_raw, axis=1, keepdims=True), EPS)
        u = u_raw / u_norm
        r_norm = np.maximum(np.linalg.norm(r, axis=1, keepdims=True), EPS)
        v = r / r_norm
        logits = (u @ v.T) / temperature
        if log_q is not None:
            logits = logits - log_q[targets][None, :].astype(logits.dtype)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.mean(np.log(np.maximum(p[np.arange(B), y], 1e-30))))
        if not need_grad:
            return loss, None
        g = p
        g[np.arange(B), y] -= 1.0
        g /= B
        du = (g @ v) / temperature
        dv = (g.T @ u) / temperature
        du_raw = (du - u * np.sum(u * du, axis=1, keepdims=True)) / u_norm
        dr = (dv - v * np.sum(v * dv, axis=1, keepdims=True)) / r_norm
        draw = np.zeros((len(rows), 2 * d), dtype=raw.dtype)
        draw[t_inv, :d] = dr  # targets are distinct rows
        draw[:, d:] = segment_sum(ha * du_raw[hb], h_inv, len(rows))
        pos, feat, w = self._features(rows)
        dfeats = segment_sum(w[:, None] * draw[pos], feat, self.feats.shape[0])
        if dropped.any():
            draw[t_inv[dropped], :d] = 0.0  # the dropped id rows took no part
        dufeats = None
        if ufs is not None and batch.users is not None:
            w = self.uw[batch.users]
            upos, uk = np.nonzero(w)
            dufeats = segment_sum(w[upos, uk][:, None] * du_raw[upos], self.uidx[batch.users][upos, uk],
                                  len(self.ufeats)).astype(raw.dtype, copy=False)
        return loss, Gradients(rows, draw, dfeats.astype(raw.dtype, copy=False), dufeats)

    # ------------------------------------------------------------ storage

    def to_bytes(self, **extra: np.ndarray) -> bytes:
        """The weights as npz bytes (plus ``extra`` arrays, e.g. the item keys of the rows)."""
        buf = io.BytesIO()
        arrays: dict[str, Any] = {"ids": self.ids, "feats": self.feats, "fidx": self.fidx, "fw": self.fw,
                                  "ufeats": self.ufeats, "uidx": self.uidx, "uw": self.uw} | extra
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> TwoTower:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            user = [z[k] if k in z.files else None for k in ("ufeats", "uidx", "uw")]  # older models: none
            return cls(z["ids"], z["feats"], z["fidx"], z["fw"], *user)


def segment_sum(values: np.ndarray, ids: np.ndarray, n: int, *, ordered: bool = False) -> np.ndarray:
    """``out[ids[k]] += values[k]`` row-wise, as a sort and ``np.add.reduceat`` (far faster than np.add.at).

    ``ordered``: ids are already non-decreasing (skips the sort).
    """
    out = np.zeros((n, values.shape[1]), dtype=values.dtype)
    if len(ids) == 0:
        return out
    if not ordered:
        order = np.argsort(ids, kind="stable")
        ids, values = ids[order], values[order]
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    out[ids[starts]] = np.add.reduceat(values, starts, axis=0)
    return out


def user_vectors(context: np.ndarray, hist_items: np.ndarray, hist_weights: np.ndarray,
                 features: np.ndarray | None = None) -> np.ndarray:
    """Rows ``normalise(sum_l w_l context[item_l] + features)`` (``features``: the users'
    :meth:`TwoTower.user_feature_sum`); a row of zeros where nothing sums."""
    u = np.einsum("bl,bld->bd", hist_weights, context[hist_items])
    if features is not None:
        u = u + features
    n = np.linalg.norm(u, axis=1, keepdims=True)
    return np.where(n > EPS, u / np.maximum(n, EPS), 0.0)


def user_vector(context: Sequence[Sequence[float]] | Sequence[np.ndarray] | np.ndarray, weights: Sequence[float],
                times: Sequence[float], *, max_events: int = 50, half_life_days: float = 30.0,
                features: Sequence[Sequence[float]] | np.ndarray | None = None) -> np.ndarray | None:
    """The contract's user vector for one history given oldest first: the context vectors of the events,
    the events' weights and times (epoch seconds), plus the vectors of the user's known property tokens
    (``features``, T rows, added as their sum / sqrt(T)). The last ``max_events`` events count; None when
    nothing sums."""
    ctx = np.asarray(context, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    t = np.asarray(times, dtype=np.float64)
    f = np.asarray(features if features is not None else np.zeros((0, max(1, ctx.shape[-1]))), dtype=np.float64)
    if ctx.ndim != 2 or len(ctx) != len(w) or len(w) != len(t):
        raise InvalidRequest("user_vector: context, weights and times must have one row per event")
    if not (np.all(np.isfinite(ctx)) and np.all(np.isfinite(w)) and np.all(np.isfinite(t))
            and np.all(np.isfinite(f))):
        raise InvalidRequest("user_vector: NaN or infinite value in the history")
    if len(w) == 0 and len(f) == 0:
        return None
    u = np.zeros(f.shape[1] if len(f) else ctx.shape[1])
    if len(w):
        ctx, w, t = ctx[-max_events:], w[-max_events:], t[-max_events:]
        u = u + (w * np.exp2(-(t.max() - t) / (half_life_days * 86400.0))) @ ctx
    if len(f):
        u = u + f.sum(axis=0) / np.sqrt(len(f))
    n = float(np.linalg.norm(u))
    return None if n <= EPS else u / n
