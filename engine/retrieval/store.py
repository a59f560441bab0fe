"""Training from the database and serving the result: vectors into pgvector, the model into pgrec.models.

The switch is one transaction: the new model row is inserted, every item's vector and context vector and
every user's vector are upserted from COPY-filled staging tables (the HNSW index on ``item_embeddings`` is
maintained by PostgreSQL as rows change), the previous retrieval model is deactivated and the new one
activated; then COMMIT. Readers see the old vectors until the commit and the new ones after it, never a mix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg

from engine import neighbors
from engine.errors import InvalidRequest
from engine.retrieval.data import Positives, RetrievalData, load, user_tokens
from engine.retrieval.model import TwoTower, user_vector, user_vectors
from engine.retrieval.train import BatchHook, EpochHook, RetrievalConfig, TrainResult, train
from engine.sql import query

# catalogs up to this size get their stored item-embedding neighbours in the vectors' transaction
NEIGHBORS_IN_STORE_MAX = 50_000


@dataclass
class StoredModel:
    version: int
    items: int
    users: int
    based_on: datetime
    result: TrainResult


def schema_dim(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(query("retrieval.settings")).fetchone()
    assert row is not None
    return int(row[0])


def check_dimension(conn: psycopg.Connection[Any], dim: int) -> None:
    """The model's dimension must be the schema's (``pgrec.config`` 'embedding_dim')."""
    expected = schema_dim(conn)
    if dim != expected:
        raise InvalidRequest(
            f"dim: the model has {dim} dimensions but the schema's vectors have {expected} "
            f"(pgrec.config 'embedding_dim', fixed at install); train with --dim {expected}"
        )


def final_user_vectors(data: RetrievalData, context: np.ndarray,
                       model: TwoTower | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(user keys, vectors) at the end of ``data`` for the users with a positive history, by the contract's
    formula over ``context`` (the stored, float32-rounded context vectors) and the model's user feature
    vectors (float32-rounded as stored)."""
    pos = Positives.of(data)
    users = np.unique(pos.user)
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, context.shape[1]))
    starts = np.searchsorted(pos.user, users, side="left")
    ends = np.searchsorted(pos.user, users, side="right")
    hi, hw = pos.histories(ends, starts, data.max_events, data.half_life_days)
    feats = None
    if model is not None and len(model.ufeats):
        stored = TwoTower(model.ids, model.feats, model.fidx, model.fw,
                          model.ufeats.astype(np.float32).astype(np.float64), model.uidx,
                          model.uw.astype(np.float64))
        feats = stored.user_feature_sum(users)
    U = user_vectors(context.astype(np.float64), hi, hw, feats)
    ok = np.linalg.norm(U, axis=1) > 0
    return data.user_keys[users[ok]], U[ok]


def _vec(row: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in row) + "]"


def train_and_store(conn: psycopg.Connection[Any], config: RetrievalConfig | None = None, *,
                    as_of: datetime | None = None, on_batch: BatchHook | None = None,
                    on_epoch: EpochHook | None = None) -> StoredModel:
    """Read events before ``as_of`` (None: all), train, store vectors and the model, activate it."""
    cfg = config or RetrievalConfig()
    check_dimension(conn, cfg.dim)
    data = load(conn, as_of, properties=cfg.properties)
    if len(data.ev_time) == 0:
        raise InvalidRequest("there are no events to train on" + (f" before {as_of.isoformat()}" if as_of else ""))
    result = train(data, cfg, on_batch=on_batch, on_epoch=on_epoch)
    return store(conn, data, result)


def store(conn: psycopg.Connection[Any], data: RetrievalData, result: TrainResult) -> StoredModel:
    """Write one trained model and its vectors in a single transaction and make it the active one; stored user
    vectors of users the model has none for are deleted (they were in the replaced model's space)."""
    check_dimension(conn, result.model.dim)
    V = result.model.item_vectors().astype(np.float32)
    C = result.model.context_vectors().astype(np.float32)
    if not (np.all(np.isfinite(V)) and np.all(np.isfinite(C))):
        raise InvalidRequest("training diverged: NaN or infinite vectors (lower --lr); nothing was stored")
    user_keys, U = final_user_vectors(data, C, result.model)
    last = float(data.ev_time.max())
    based_on = data.as_of or (datetime.fromtimestamp(last, tz=UTC) + timedelta(microseconds=1))
    window = {"as_of": data.as_of.isoformat() if data.as_of else None, "based_on": based_on.isoformat(),
              "first_event": datetime.fromtimestamp(float(data.ev_time.min()), tz=UTC).isoformat(),
              "last_event": datetime.fromtimestamp(last, tz=UTC).isoformat(),
              "events": len(data.ev_time), "users": data.n_users, "items": data.n_items}
    params = asdict(result.config) | {"max_events": data.max_events, "half_life_days": data.half_life_days}
    artifact = result.model.to_bytes(item_keys=data.item_keys)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(query("retrieval.insert_model"), {
            "artifact": artifact, "params": json.dumps(params), "features": json.dumps(result.vocabulary.tokens),
            "metrics": json.dumps(result.metrics()), "data_window": json.dumps(window)})
        row = cur.fetchone()
        assert row is not None
        version = int(row[0])
        tag = str(version)
        cur.execute(query("retrieval.create_item_stage"))
        with cur.copy("COPY stage_retrieval_items (item_key, embedding, context_embedding, model_version) "
                      "FROM STDIN") as copy:
            for key, v, c in zip(data.item_keys.tolist(), V, C, strict=True):
                copy.write_row((key, _vec(v), _vec(c), tag))
        cur.execute(query("retrieval.merge_item_vectors"))
        cur.execute(query("retrieval.create_user_stage"))
        with cur.copy("COPY stage_retrieval_users (user_key, embedding, model_version, based_on) FROM STDIN") as copy:
            for key, u in zip(user_keys.tolist(), U, strict=True):
                copy.write_row((key, _vec(u.astype(np.float32)), tag, based_on))
        cur.execute(query("retrieval.merge_user_vectors"))
        cur.execute(query("retrieval.drop_other_user_vectors"), {"version": tag})
        # the user tower's property-token vectors: replaced as a whole, in the same transaction
        cur.execute(query("retrieval.clear_user_features"))
        with cur.copy("COPY pgrec.user_feature_embeddings (token, embedding, model_version) FROM STDIN") as copy:
            for token, g in zip(result.user_vocabulary.tokens, result.model.ufeats.astype(np.float32), strict=True):
                copy.write_row((token, _vec(g), tag))
        if len(data.item_keys) <= NEIGHBORS_IN_STORE_MAX:
            # the history source's stored embedding neighbours, current with these vectors from the same commit
            # (bigger catalogs: `pgrec train neighbours`; until then the source searches the index per seed item)
            neighbors.refresh(cur, data.item_keys.tolist())
        cur.execute(query("retrieval.deactivate_models"), {"version": version})
        cur.execute(query("retrieval.activate_model"), {"version": version})
    return StoredModel(version, len(data.item_keys), len(user_keys), based_on, result)


# ---------------------------------------------------------------- the user vector from stored rows


def history(conn: psycopg.Connection[Any], user_key: int, as_of: datetime) -> Iterator[tuple[int, float, float]]:
    """(item_key, weight, epoch seconds) of the user's positive events strictly before ``as_of``, oldest first."""
    for item, w, t in conn.execute(query("retrieval.user_history"), {"user_key": user_key, "as_of": as_of}):
        yield int(item), float(w), float(t)


def stored_user_vector(conn: psycopg.Connection[Any], user_key: int, as_of: datetime) -> np.ndarray | None:
    """The contract's user vector computed in Python from the stored context vectors (the twin of
    ``pgrec.user_vector``, without its shortcut through ``user_embeddings``)."""
    settings = conn.execute(query("retrieval.settings")).fetchone()
    assert settings is not None
    _, max_events, half_life = settings
    rows = list(history(conn, user_key, as_of))[-int(max_events):]
    keys = [r[0] for r in rows]
    ctx = dict(conn.execute(query("retrieval.context_vectors_of"), {"items": keys}).fetchall())
    kept = [(np.asarray(ctx[k], dtype=np.float64), w, t) for k, w, t in rows if k in ctx]
    props = conn.execute(query("retrieval.user_properties_of"), {"user_key": user_key}).fetchone()
    tokens = user_tokens(props[0] if props else None)
    fvec = dict(conn.execute(query("retrieval.user_feature_vectors_of"), {"tokens": tokens}).fetchall())
    features = [np.asarray(fvec[t], dtype=np.float64) for t in tokens if t in fvec]
    if not kept and not features:
        return None
    # the decay is anchored at the newest of the last max_events events, with or without a vector
    latest = max((t for _, _, t in rows), default=0.0)
    weights = [w * 2.0 ** (-(latest - t) / (float(half_life) * 86400.0)) for _, w, t in kept]
    dim = len(features[0]) if features else len(kept[0][0])
    return user_vector(np.asarray([c for c, _, _ in kept], dtype=np.float64).reshape(-1, dim), weights,
                       [latest] * len(kept), max_events=int(max_events), half_life_days=float(half_life),
                       features=np.asarray(features, dtype=np.float64).reshape(-1, dim) if features else None)
