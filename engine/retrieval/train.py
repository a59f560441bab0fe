"""Training the two-tower model: pairs, mini-batches, Adam, validation recall@100 and early stopping.

The last ``validation_fraction`` of the positive events (by time) is held out: the model trains on the pairs
before that time and is scored each epoch by recall@100 of the users' next items. The best epoch wins; with
``refit`` the model is then trained again from the same seed on every pair for that many epochs, so the
newest events (often the most telling) are not left out of the served model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.errors import InvalidRequest
from engine.retrieval.data import GLOBAL_TOKEN, FeatureVocabulary, Positives, RetrievalData
from engine.retrieval.model import Batch, Gradients, TwoTower, user_vectors


@dataclass(frozen=True)
class RetrievalConfig:
    """Training settings; every field documents its default."""

    dim: int = 64                        # vector dimension: must equal the schema's embedding_dim to be stored
    epochs: int = 30                     # at most; early stopping picks the best epoch
    batch_size: int = 512
    lr: float = 0.005                    # Adam step size
    temperature: float = 0.07            # softmax temperature on cosine similarities
    weight_decay: float = 0.0            # decoupled (AdamW), on the rows a batch touches
    log_q: bool = True                   # subtract log(item frequency) from the logits (sampling-bias correction)
    extra_negatives: int = 128           # at most this many shown-but-ignored / disliked items per batch
    random_negatives: int = 0            # uniformly drawn items added to every batch (mixed negative sampling)
    id_dropout: float = 0.0              # share of a batch's items embedded by features alone (cold start)
    patience: int = 3                    # epochs without a better validation recall before stopping
    validation_fraction: float = 0.1     # latest share of positive events held out for early stopping (0: none)
    validation_users: int = 2000         # at most this many users scored per validation
    validation_k: int = 100
    refit: bool = True                   # after early stopping, retrain on every pair for the best epoch count
    min_feature_count: int = 2           # feature tokens rarer than this are dropped
    max_features_per_item: int = 16
    properties: tuple[str, ...] | None = None  # item properties used as features (None: all but free text)
    user_features: bool = True           # the users' property tokens join the user tower (pgrec.user_vector too)
    seed: int = 0

    def validate(self) -> None:
        checks = {
            "dim": self.dim >= 2, "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0, "temperature": self.temperature > 0, "weight_decay": self.weight_decay >= 0,
            "patience": self.patience >= 1, "validation_fraction": 0 <= self.validation_fraction < 1,
            "extra_negatives": self.extra_negatives >= 0, "validation_k": self.validation_k >= 1,
            "random_negatives": self.random_negatives >= 0, "id_dropout": 0 <= self.id_dropout < 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidRequest(f"{name}: invalid value {getattr(self, name)!r}")


@dataclass
class EpochStats:
    epoch: int
    phase: str              # "fit" (with validation) or "refit" (all pairs)
    loss: float
    val_recall: float | None
    seconds: float          # since training started


@dataclass
class TrainResult:
    model: TwoTower
    vocabulary: FeatureVocabulary
    config: RetrievalConfig
    epochs: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_val_recall: float | None = None
    seconds_to_best: float = 0.0
    seconds_total: float = 0.0
    pairs: int = 0
    trained_items: int = 0   # items with at least one training pair (the rest mostly by their features)
    user_vocabulary: FeatureVocabulary = field(default_factory=lambda: FeatureVocabulary([]))

    def metrics(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "val_recall@100": self.best_val_recall,
                "seconds_to_best": round(self.seconds_to_best, 2), "seconds_total": round(self.seconds_total, 2),
                "pairs": self.pairs, "trained_items": self.trained_items,
                "epochs": [asdict(e) for e in self.epochs]}


BatchHook = Callable[[int], None]
EpochHook = Callable[[EpochStats, int], None]  # (stats, batches per epoch)


class Adam:
    """Adam with lazy (touched rows only) updates for the id table and dense updates for the feature table."""

    def __init__(self, model: TwoTower, lr: float, weight_decay: float = 0.0,
                 b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.model, self.lr, self.wd, self.b1, self.b2, self.eps = model, lr, weight_decay, b1, b2, eps
        self.m_ids = np.zeros_like(model.ids)
        self.v_ids = np.zeros_like(model.ids)
        self.m_f = np.zeros_like(model.feats)
        self.v_f = np.zeros_like(model.feats)
        self.m_u = np.zeros_like(model.ufeats)
        self.v_u = np.zeros_like(model.ufeats)
        self.t = 0

    def step(self, g: Gradients) -> None:
        self.t += 1
        lr = float(self.lr * np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t))
        rows = g.rows
        m = self.b1 * self.m_ids[rows] + (1 - self.b1) * g.ids
        v = self.b2 * self.v_ids[rows] + (1 - self.b2) * g.ids * g.ids
        self.m_ids[rows], self.v_ids[rows] = m, v
        upd = lr * m / (np.sqrt(v) + self.eps)
        if self.wd:
            upd += self.lr * self.wd * self.model.ids[rows]
        self.model.ids[rows] -= upd.astype(self.model.ids.dtype)
        self._dense(self.model.feats, self.m_f, self.v_f, g.feats, lr)
        if g.ufeats is not None and len(self.model.ufeats):
            self._dense(self.model.ufeats, self.m_u, self.v_u, g.ufeats, lr)

    def _dense(self, param: np.ndarray, m: np.ndarray, v: np.ndarray, grad: np.ndarray, lr: float) -> None:
        """One Adam step on a whole table (moments updated in place)."""
        m *= self.b1
        m += (1 - self.b1) * grad
        v *= self.b2
        v += (1 - self.b2) * grad * grad
        upd = lr * m / (np.sqrt(v) + self.eps)
        if self.wd:
            upd += self.lr * self.wd * param
        param -= upd.astype(param.dtype)


@dataclass
class _Validation:
    users: np.ndarray          # user indices, one per row
    hist_items: np.ndarray
    hist_weights: np.ndarray
    seen_rows: np.ndarray
    seen_items: np.ndarray
    truth_rows: np.ndarray
    truth_items: np.ndarray


class _HardNegatives:
    """Per-user extra negatives (shown but ignored, disliked), sorted by user for lookups."""

    def __init__(self, users: np.ndarray, items: np.ndarray) -> None:
        order = np.lexsort((items, users))
        self.users, self.items = users[order], items[order]

    def sample(self, batch_users: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        if k == 0 or len(self.users) == 0:
            return np.zeros(0, dtype=np.int64)
        found = self.items[np.isin(self.users, batch_users)]
        if len(found) > k:
            found = rng.choice(found, size=k, replace=False)
        return found.astype(np.int64)


def recall_at_k(model: TwoTower, val: _Validation, k: int, chunk: int = 1024) -> float:
    """Mean over users of hits@k / min(k, |truth|), the user's seen items excluded (exact scoring)."""
    V = model.item_vectors()
    C = model.context_vectors()
    n_users = len(val.hist_items)
    lists = top_k(V, C, val.hist_items, val.hist_weights, val.seen_rows, val.seen_items, k, chunk,
                  features=model.user_feature_sum(val.users))
    truth = np.zeros((n_users, model.n_items), dtype=bool)
    truth[val.truth_rows, val.truth_items] = True
    hits = truth[np.arange(n_users)[:, None], lists].sum(axis=1)
    sizes = np.bincount(val.truth_rows, minlength=n_users)
    ok = sizes > 0
    return float(np.mean(hits[ok] / np.minimum(sizes[ok], k))) if ok.any() else 0.0


def top_k(item_vectors: np.ndarray, context: np.ndarray, hist_items: np.ndarray, hist_weights: np.ndarray,
          seen_rows: np.ndarray, seen_items: np.ndarray, k: int, chunk: int = 1024,
          features: np.ndarray | None = None) -> np.ndarray:
    """(users, k) best items by exact cosine for each history (plus the users' feature sums), the (row, item)
    pairs in ``seen`` excluded."""
    n_users, n_items = len(hist_items), len(item_vectors)
    k = min(k, n_items)
    out = np.zeros((n_users, k), dtype=np.int64)
    for lo in range(0, n_users, chunk):
        hi = min(n_users, lo + chunk)
        U = user_vectors(context, hist_items[lo:hi], hist_weights[lo:hi],
                         None if features is None else features[lo:hi])
        s = U @ item_vectors.T
        sel = (seen_rows >= lo) & (seen_rows < hi)
        s[seen_rows[sel] - lo, seen_items[sel]] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        out[lo:hi] = np.take_along_axis(part, order, axis=1)
    return out


def _validation(data: RetrievalData, pos: Positives, cut: float, max_users: int,
                rng: np.random.Generator) -> _Validation | None:
    """Users with new positive items at or after ``cut`` and a positive history before it."""
    after = pos.time >= cut
    users = np.unique(pos.user[after])
    if len(users) == 0:
        return None
    ends = pos.before(users, cut)
    starts = np.searchsorted(pos.user, users, side="left")
    users, ends, starts = users[ends > starts], ends[ends > starts], starts[ends > starts]
    if len(users) > max_users:
        keep = np.sort(rng.choice(len(users), size=max_users, replace=False))
        users, ends, starts = users[keep], ends[keep], starts[keep]
    if len(users) == 0:
        return None
    row_of = np.full(data.n_users, -1, dtype=np.int64)
    row_of[users] = np.arange(len(users))
    before = data.ev_time < cut
    s_rows, s_items = row_of[data.ev_user[before]], data.ev_item[before]
    s_keep = s_rows >= 0
    seen = np.unique(np.stack([s_rows[s_keep], s_items[s_keep]]), axis=1)
    t_rows, t_items = row_of[pos.user[after]], pos.item[after]
    t_keep = t_rows >= 0
    truth = np.unique(np.stack([t_rows[t_keep], t_items[t_keep]]), axis=1)
    seen_codes = seen[0] * data.n_items + seen[1]
    new = ~np.isin(truth[0] * data.n_items + truth[1], seen_codes)
    truth = truth[:, new]
    hi, hw = pos.histories(ends, starts, data.max_events, data.half_life_days)
    return _Validation(users, hi, hw, seen[0], seen[1], truth[0], truth[1])


def train(data: RetrievalData, config: RetrievalConfig | None = None, *, on_batch: BatchHook | None = None,
          on_epoch: EpochHook | None = None, dtype: type = np.float32) -> TrainResult:
    """Fit the two towers on ``data``. Deterministic for ``config.seed``."""
    cfg = config or RetrievalConfig()
    cfg.validate()
    if data.n_items == 0:
        raise InvalidRequest("there are no items to embed")
    vocab = FeatureVocabulary.build(data.item_tokens, min_count=cfg.min_feature_count,
                                    max_per_item=cfg.max_features_per_item)
    fidx, fw = vocab.encode(data.item_tokens)
    uvocab = FeatureVocabulary.build(data.user_tokens if cfg.user_features else [], min_count=cfg.min_feature_count,
                                     max_per_item=1_000_000)
    uvocab.tokens = [t for t in uvocab.tokens if t != GLOBAL_TOKEN]
    uidx, uw = uvocab.encode(data.user_tokens) if len(uvocab) else (None, None)
    pos = Positives.of(data)
    pairs = np.flatnonzero(pos.hist_end > pos.block_start)
    if len(pairs) == 0:
        raise InvalidRequest("no training pairs: every user needs a positive event after an earlier positive one")
    rng = np.random.default_rng(cfg.seed)
    val = None
    cut = np.inf
    if cfg.validation_fraction > 0:
        cut = float(np.quantile(pos.time[pairs], 1 - cfg.validation_fraction))
        val = _validation(data, pos, cut, cfg.validation_users, rng)
        if val is None or len(val.truth_rows) == 0 or np.sum(pos.time[pairs] < cut) < cfg.batch_size:
            val, cut = None, np.inf
    result = TrainResult(TwoTower.init(data.n_items, fidx, fw, len(vocab), cfg.dim, rng, dtype, uidx, uw,
                                       len(uvocab)), vocab, cfg, user_vocabulary=uvocab)
    t0 = time.perf_counter()
    neg_mask = data.ev_polarity == -1
    if val is None:
        _fit(result, data, pos, pairs, cfg, cfg.epochs, None, "fit", t0, on_batch, on_epoch)
        result.best_epoch = cfg.epochs
        result.seconds_to_best = time.perf_counter() - t0
    else:
        train_pairs = pairs[pos.time[pairs] < cut]
        hard = _HardNegatives(np.concatenate([data.ignored_user, data.ev_user[neg_mask & (data.ev_time < cut)]]),
                              np.concatenate([data.ignored_item, data.ev_item[neg_mask & (data.ev_time < cut)]]))
        _fit(result, data, pos, train_pairs, cfg, cfg.epochs, val, "fit", t0, on_batch, on_epoch, hard)
        if cfg.refit:
            rng = np.random.default_rng(cfg.seed)
            result.model = TwoTower.init(data.n_items, fidx, fw, len(vocab), cfg.dim, rng, dtype, uidx, uw,
                                         len(uvocab))
            _fit(result, data, pos, pairs, cfg, result.best_epoch, None, "refit", t0, on_batch, on_epoch)
    result.seconds_total = time.perf_counter() - t0
    result.pairs = len(pairs)
    touched = np.zeros(data.n_items, dtype=bool)
    touched[pos.item[pairs]] = True   # items with a training pair (not every item with a positive event)
    result.trained_items = int(touched.sum())
    return result


def _fit(result: TrainResult, data: RetrievalData, pos: Positives, pairs: np.ndarray, cfg: RetrievalConfig,
         epochs: int, val: _Validation | None, phase: str, t0: float, on_batch: BatchHook | None,
         on_epoch: EpochHook | None, hard: _HardNegatives | None = None) -> None:
    model = result.model
    if hard is None:
        neg = data.ev_polarity == -1
        hard = _HardNegatives(np.concatenate([data.ignored_user, data.ev_user[neg]]),
                              np.concatenate([data.ignored_item, data.ev_item[neg]]))
    rng = np.random.default_rng(cfg.seed + (1 if phase == "refit" else 0))
    counts = np.bincount(pos.item[pairs], minlength=data.n_items).astype(np.float64)
    # log of the expected number of times an item is among a batch's candidates (in-batch + uniform draws)
    # (an item without pairs, e.g. a shown-but-ignored one, counts as one pair so its logit is not inflated)
    expected = cfg.batch_size * np.maximum(counts, 1.0) / max(1.0, counts.sum()) + cfg.random_negatives / data.n_items
    log_q = np.log(expected) if cfg.log_q else None
    opt = Adam(model, cfg.lr, cfg.weight_decay)
    n_batches = max(1, len(pairs) // cfg.batch_size)
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    since_best = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(pairs)
        losses = []
        for b in range(n_batches):
            idx = order[b * cfg.batch_size: (b + 1) * cfg.batch_size] if b < n_batches - 1 else \
                order[b * cfg.batch_size:]
            hi, hw = pos.histories(pos.hist_end[idx], pos.block_start[idx], data.max_events, data.half_life_days)
            negatives = hard.sample(np.unique(pos.user[idx]), cfg.extra_negatives, rng)
            if cfg.random_negatives:
                negatives = np.concatenate([negatives, rng.integers(0, data.n_items, cfg.random_negatives)])
            drop = None
            if cfg.id_dropout:
                items = pos.item[idx]
                drop = items[rng.random(len(items)) < cfg.id_dropout]
            loss, grads = model.loss_and_grad(Batch(hi, hw, pos.item[idx], negatives, pos.user[idx]),
                                              cfg.temperature, log_q, id_dropout=drop)
            assert grads is not None
            opt.step(grads)
            losses.append(loss)
            if on_batch:
                on_batch(1)
        recall = recall_at_k(model, val, cfg.validation_k) if val is not None else None
        stats = EpochStats(epoch, phase, float(np.mean(losses)), recall, time.perf_counter() - t0)
        result.epochs.append(stats)
        if on_epoch:
            on_epoch(stats, n_batches)
        if val is None:
            continue
        assert recall is not None
        if result.best_val_recall is None or recall > result.best_val_recall:
            result.best_val_recall, result.best_epoch = recall, epoch
            result.seconds_to_best = stats.seconds
            best = (model.ids.copy(), model.feats.copy(), model.ufeats.copy())
            since_best = 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    if val is not None and best is not None:
        model.ids, model.feats, model.ufeats = best


def batches_per_epoch(data: RetrievalData, config: RetrievalConfig) -> int:
    """For a progress bar's total."""
    pos = Positives.of(data)
    n = int(np.sum(pos.hist_end > pos.block_start))
    return max(1, int(n * (1 - config.validation_fraction)) // config.batch_size)
