"""The two-tower retrieval model: gradients, planted structure, SQL/Python user-vector parity, storage, bad input,
EASE, and the embedding import it shares with the foundation."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_DIM, TestDB

from engine import datasets, ingest
from engine.errors import InvalidRequest
from engine.retrieval import ease
from engine.retrieval.data import FeatureVocabulary, Positives, RetrievalData, item_tokens, property_tokens
from engine.retrieval.model import Batch, TwoTower, user_vector
from engine.retrieval.store import check_dimension, stored_user_vector, train_and_store
from engine.retrieval.train import RetrievalConfig, top_k, train

NOW = datetime(2026, 6, 1, tzinfo=UTC)


# ---------------------------------------------------------------- gradients


def _tiny(rng: np.random.Generator) -> tuple[TwoTower, Batch]:
    n_items, n_feat, dim = 7, 5, 3
    fidx = rng.integers(0, n_feat, size=(n_items, 2))
    fw = np.where(rng.random((n_items, 2)) < 0.8, 0.7, 0.0)
    # three users with property tokens (user 2 has none: history only)
    uidx = np.array([[0, 1], [2, 0], [0, 0]])
    uw = np.array([[0.7, 0.7], [1.0, 0.0], [0.0, 0.0]])
    model = TwoTower.init(n_items, fidx, fw, n_feat, dim, rng, dtype=np.float64, uidx=uidx, uw=uw,
                          n_user_features=3)
    model.ids = rng.normal(size=model.ids.shape)  # nonzero ids so their gradients are exercised too
    model.ufeats = rng.normal(size=model.ufeats.shape)
    hist = rng.integers(0, n_items, size=(4, 3))
    weights = rng.random((4, 3))
    weights[1, 0] = 0.0  # padding
    batch = Batch(hist, weights, np.array([0, 2, 2, 5]), np.array([6, 0]), users=np.array([0, 1, 2, 0]))
    return model, batch


@pytest.mark.parametrize("dropout", [None, np.array([2, 6])])
def test_gradients_match_finite_differences(dropout: np.ndarray | None) -> None:
    rng = np.random.default_rng(3)
    model, batch = _tiny(rng)
    log_q = np.log(rng.random(model.n_items) + 0.1)
    loss, grads = model.loss_and_grad(batch, 0.3, log_q, id_dropout=dropout)
    assert grads is not None
    full_ids = np.zeros_like(model.ids)
    full_ids[grads.rows] = grads.ids
    eps = 1e-6
    assert grads.ufeats is not None
    for name, analytic in (("ids", full_ids), ("feats", grads.feats), ("ufeats", grads.ufeats)):
        param = getattr(model, name)
        for idx in np.ndindex(param.shape):
            old = param[idx]
            param[idx] = old + eps
            up, _ = model.loss_and_grad(batch, 0.3, log_q, need_grad=False, id_dropout=dropout)
            param[idx] = old - eps
            down, _ = model.loss_and_grad(batch, 0.3, log_q, need_grad=False, id_dropout=dropout)
            param[idx] = old
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - analytic[idx]) < 1e-6 + 1e-4 * abs(numeric), (name, idx, numeric, analytic[idx])
    assert loss > 0


# ---------------------------------------------------------------- planted clusters


def _synthetic(users: int = 300, items: int = 160, events: int = 9000, seed: int = 5) -> datasets.Synthetic:
    return datasets.generate(datasets.GeneratorConfig(users=users, items=items, events=events, clusters=4,
                                                      days=60, seed=seed), now=NOW)


def _arrays(data: datasets.Synthetic) -> RetrievalData:
    types = {"view": (1.0, 1), "click": (2.0, 1), "like": (4.0, 1), "purchase": (8.0, 1), "dislike": (4.0, -1)}
    ev = data.events
    return RetrievalData.from_arrays(
        list(range(len(data.items))), [item_tokens(it["categories"], it["properties"]) for it in data.items],
        [int(e["user_id"][1:]) for e in ev], [int(e["item_id"][1:]) for e in ev],
        [types[e["event_type"]][1] for e in ev], [types[e["event_type"]][0] for e in ev],
        [datetime.fromisoformat(e["occurred_at"]).timestamp() for e in ev])


def test_training_recovers_planted_clusters() -> None:
    synth = _synthetic()
    data = _arrays(synth)
    result = train(data, RetrievalConfig(dim=16, epochs=6, batch_size=128, seed=1))
    assert result.best_epoch >= 1 and result.best_val_recall is not None
    # every user's top 20 items (seen excluded) by exact cosine: far more of their own cluster than chance (1/4)
    pos = Positives.of(data)
    users = np.unique(pos.user)
    starts = np.searchsorted(pos.user, users, side="left")
    ends = np.searchsorted(pos.user, users, side="right")
    hi, hw = pos.histories(ends, starts, data.max_events, data.half_life_days)
    lists = top_k(result.model.item_vectors(), result.model.context_vectors(), hi, hw,
                  np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 20)
    user_cluster = synth.user_cluster[data.user_keys[users]]
    same = synth.item_cluster[data.item_keys[lists]] == user_cluster[:, None]
    assert same.mean() > 0.7, same.mean()
    # deterministic for a seed
    again = train(data, RetrievalConfig(dim=16, epochs=6, batch_size=128, seed=1))
    assert np.array_equal(again.model.ids, result.model.ids)


def test_cold_item_gets_a_vector_from_its_features() -> None:
    synth = _synthetic()
    data = _arrays(synth)
    # a new item: the categories of cluster 0's items, no events
    cat = synth.items[int(np.flatnonzero(synth.item_cluster == 0)[0])]["categories"]
    data.item_keys = np.append(data.item_keys, 10_000)
    data.item_tokens.append(item_tokens(cat, {}))
    data.item_created = np.append(data.item_created, 0.0)
    result = train(data, RetrievalConfig(dim=16, epochs=4, batch_size=128, seed=2))
    v = result.model.item_vectors()
    assert np.isclose(np.linalg.norm(v[-1]), 1.0)
    assert np.all(result.model.ids[-1] == 0)  # only its features speak for it
    same = v[:-1][np.isin(synth.item_cluster, [0])] @ v[-1]
    other = v[:-1][~np.isin(synth.item_cluster, [0])] @ v[-1]
    assert same.mean() > other.mean()


# ---------------------------------------------------------------- bad input


def test_bad_input_is_named() -> None:
    with pytest.raises(InvalidRequest, match="unknown item 99"):
        RetrievalData.from_arrays([1, 2], [["*"], ["*"]], [1], [99], [1], [1.0], [0.0])
    with pytest.raises(InvalidRequest, match="finite"):
        RetrievalData.from_arrays([1, 2], [["*"], ["*"]], [1], [1], [1], [float("nan")], [0.0])
    with pytest.raises(InvalidRequest, match="no training pairs"):
        train(RetrievalData.from_arrays([1, 2], [["*"], ["*"]], [1], [1], [1], [1.0], [0.0]),
              RetrievalConfig(dim=4))
    with pytest.raises(InvalidRequest, match="temperature"):
        RetrievalConfig(temperature=0).validate()
    assert user_vector(np.zeros((0, 3)), [], []) is None
    with pytest.raises(InvalidRequest, match="NaN"):
        user_vector([[float("nan"), 1.0]], [1.0], [0.0])
    with pytest.raises(InvalidRequest, match="one row per event"):
        user_vector([[1.0, 0.0]], [1.0, 2.0], [0.0])


def test_user_vector_formula() -> None:
    day = 86400.0
    ctx = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = user_vector(ctx, [2.0, 1.0, 4.0], [0.0, 30 * day, 30 * day], half_life_days=30.0, max_events=2)
    # the oldest event is beyond max_events; the other two are equally recent
    want = 1.0 * ctx[1] + 4.0 * ctx[2]
    assert got is not None and np.allclose(got, want / np.linalg.norm(want))
    got = user_vector(ctx[:2], [1.0, 1.0], [0.0, 30 * day], half_life_days=30.0)
    want = 0.5 * ctx[0] + ctx[1]
    assert got is not None and np.allclose(got, want / np.linalg.norm(want))


def test_features_vocabulary() -> None:
    toks = item_tokens(["Drama", ""], {"title": "X", "year": 1995, "tags": ["a", "b"], "price": 9.5,
                                       "nested": {"x": 1}})
    assert toks == ["*", "cat:Drama", "price~3", "tags=a", "tags=b", "year=1995"]
    vocab = FeatureVocabulary.build([toks, ["*", "cat:Drama"]], min_count=2)
    assert vocab.tokens == ["*", "cat:Drama"]
    fidx, fw = vocab.encode([toks, ["*"], ["unknown"]])
    assert fidx.shape == (3, 2) and np.isclose(fw[0].sum(), 2 / np.sqrt(2)) and fw[2].sum() == 0


# ---------------------------------------------------------------- database: storage, parity, switch


def _load(db: TestDB, **kw: int) -> datasets.Synthetic:
    synth = _synthetic(**kw)
    synth.load(db.conn, embeddings=False)
    return synth


def test_train_and_store_then_sql_user_vector_matches_python(db: TestDB) -> None:
    _load(db)
    cfg = RetrievalConfig(dim=TEST_DIM, epochs=3, batch_size=128)
    stored = train_and_store(db.conn, cfg)
    assert stored.items == db.scalar("SELECT count(*) FROM pgrec.items")
    assert db.scalar("SELECT count(*) FROM pgrec.item_embeddings WHERE model_version = %s AND "
                     "context_embedding IS NOT NULL", (str(stored.version),)) == stored.items
    assert db.scalar("SELECT count(*) FROM pgrec.user_embeddings WHERE model_version = %s",
                     (str(stored.version),)) == stored.users > 0
    # the history source's stored neighbours come with the vectors, current (built in the same commit)
    assert db.scalar("""SELECT count(DISTINCT mn.item_key) FROM pgrec.model_neighbors mn
                          JOIN pgrec.item_embeddings e ON e.item_key = mn.item_key
                         WHERE mn.model = 'embedding' AND mn.built_at >= e.updated_at""") == stored.items
    row = db.conn.execute("SELECT active, params, features, metrics, data_window, length(artifact) "
                          "FROM pgrec.models WHERE version = %s", (stored.version,)).fetchone()
    assert row is not None and row[0] and row[1]["dim"] == TEST_DIM and "*" in row[2]
    assert row[3]["best_epoch"] >= 1 and row[4]["events"] > 0 and row[5] > 0
    users = [r[0] for r in db.conn.execute(
        "SELECT user_key FROM pgrec.users ORDER BY user_key LIMIT 25").fetchall()]
    times = [stored.based_on - timedelta(days=d) for d in (0, 3, 20)]
    compared = 0
    for u in users:
        for t in times:
            sql = db.scalar("SELECT pgrec.user_vector(%s, %s)::real[]", (u, t))
            py = stored_user_vector(db.conn, u, t)
            assert (sql is None) == (py is None), (u, t)
            if py is not None:
                assert np.allclose(np.asarray(sql), py, atol=2e-5), (u, t)
                compared += 1
    assert compared > 40
    # the user tower's property tokens were learned and stored; a user with no events at all still gets
    # a vector from them, the same in SQL and Python
    assert db.scalar("SELECT count(*) FROM pgrec.user_feature_embeddings WHERE model_version = %s",
                     (str(stored.version),)) > 0
    db.conn.execute("SELECT pgrec.upsert_user('newcomer', %s::jsonb)",
                    (json.dumps({"country": db.scalar("SELECT properties->>'country' FROM pgrec.users LIMIT 1")}),))
    cold = db.scalar("SELECT user_key FROM pgrec.users WHERE user_id = 'newcomer'")
    sql = db.scalar("SELECT pgrec.user_vector(%s)::real[]", (cold,))
    py = stored_user_vector(db.conn, cold, stored.based_on)
    assert sql is not None and py is not None and np.allclose(np.asarray(sql), py, atol=2e-5)
    assert db.scalar("SELECT count(*) FROM pgrec.source_ann(%s, 10)", (cold,)) == 10
    # the stored user row (used by SQL at based_on) is the same formula at the end of the data
    for u in users[:10]:
        stored_vec = db.scalar("SELECT embedding::real[] FROM pgrec.user_embeddings WHERE user_key = %s", (u,))
        py = stored_user_vector(db.conn, u, stored.based_on)
        if py is not None:
            assert np.allclose(np.asarray(stored_vec), py, atol=2e-5)


def test_property_tokens_same_in_sql_and_python(db: TestDB) -> None:
    props = {"country": "DE", "age": 35, "vip": True, "score": 2.5, "neg": -3.0, "tags": ["A", "b", 7],
             "long": "x" * 65, "empty": "", "nested": {"a": 1}, "none": None, "big": 12345678901234}
    sql = {r[0] for r in db.conn.execute("SELECT pgrec.property_tokens(%s::jsonb)", (json.dumps(props),))}
    assert sql == set(property_tokens(props))
    assert "age=35" in sql and "vip=true" in sql and "score~1" in sql and "neg~2-" in sql and "tags=a" in sql


def test_retraining_switches_in_one_transaction(db: TestDB) -> None:
    _load(db, users=120, items=80, events=3000)
    cfg = RetrievalConfig(dim=TEST_DIM, epochs=2, batch_size=64, validation_fraction=0.0)
    as_of = datetime.fromisoformat(str(db.scalar("SELECT max(occurred_at) - interval '10 days' FROM pgrec.events")))
    item = db.scalar("SELECT item_id FROM pgrec.items ORDER BY item_key LIMIT 1")
    db.conn.execute("SELECT pgrec.track_event('late-user', %s, 'purchase', %s)", (item, as_of + timedelta(days=1)))
    late = "SELECT count(*) FROM pgrec.user_embeddings e JOIN pgrec.users u USING (user_key) WHERE u.user_id = 'late-user'"
    first = train_and_store(db.conn, cfg)
    assert db.scalar(late) == 1
    second = train_and_store(db.conn, cfg, as_of=as_of)
    assert second.version > first.version
    assert db.scalar("SELECT array_agg(version) FROM pgrec.models WHERE kind = 'retrieval' AND active") == [
        second.version]
    assert db.scalar("SELECT count(DISTINCT model_version) FROM pgrec.item_embeddings") == 1
    # users the second model has no vector for (events only after its as_of) keep none from the first: that one
    # lived in the replaced item space
    assert db.conn.execute("SELECT DISTINCT model_version FROM pgrec.user_embeddings").fetchall() == [
        (str(second.version),)]
    assert db.scalar(late) == 0
    assert second.based_on == as_of
    window = db.scalar("SELECT data_window FROM pgrec.models WHERE version = %s", (second.version,))
    assert datetime.fromisoformat(window["last_event"]) < as_of


def test_wrong_dimension_and_empty_database_change_nothing(db: TestDB) -> None:
    with pytest.raises(InvalidRequest, match=f"has 8 dimensions but the schema's vectors have {TEST_DIM}"):
        check_dimension(db.conn, 8)
    with pytest.raises(InvalidRequest, match="no events"):
        train_and_store(db.conn, RetrievalConfig(dim=TEST_DIM))
    _load(db, users=50, items=40, events=800)
    with pytest.raises(InvalidRequest, match="--dim 16"):
        train_and_store(db.conn, RetrievalConfig(dim=32))
    assert db.scalar("SELECT count(*) FROM pgrec.models") == 0
    assert db.scalar("SELECT count(*) FROM pgrec.item_embeddings") == 0


def test_eval_retrieval_runs_ann_through_hnsw(db: TestDB) -> None:
    from engine.evaluation.retrieval import evaluate_retrieval
    from engine.evaluation.split import resolve_cutoff

    _load(db, users=200, items=120, events=5000)
    cutoff = resolve_cutoff(db.conn, split_fraction=0.85)
    report = evaluate_retrieval(db.conn, cutoff, RetrievalConfig(dim=TEST_DIM, epochs=3, batch_size=128),
                                ease_lambdas=(50.0,))
    assert set(report.rows) == {"two-tower (exact)", "two-tower (ann, HNSW)", "popularity", "EASE (lambda 50)"}
    exact, ann = report.rows["two-tower (exact)"], report.rows["two-tower (ann, HNSW)"]
    assert exact["recall@100"] > 0.3
    assert abs(exact["recall@100"] - ann["recall@100"]) < 0.05  # the index loses little on 120 items
    assert report.cold["items"] >= 0 and db.scalar("SELECT count(*) FROM pgrec.item_embeddings") == 0
    assert db.scalar("SELECT to_regclass('retrieval_eval_items')") is None


# ---------------------------------------------------------------- EASE


def test_ease_recommends_within_blocks() -> None:
    # two blocks of items; users hold part of one block: EASE fills in the rest of that block
    X = np.zeros((40, 10))
    rng = np.random.default_rng(0)
    for u in range(40):
        block = np.arange(5) if u % 2 == 0 else np.arange(5, 10)
        X[u, rng.choice(block, size=3, replace=False)] = 1
    B = ease.fit(X, lam=1.0)
    assert np.all(np.diag(B) == 0)
    top = ease.recommend(B, X, 2)
    for u in range(40):
        block = set(range(5)) if u % 2 == 0 else set(range(5, 10))
        assert set(top[u].tolist()) <= block and not (X[u, top[u]] > 0).any()
    with pytest.raises(InvalidRequest, match="lambda"):
        ease.fit(X, lam=0)
    with pytest.raises(InvalidRequest, match="item columns"):
        ease.recommend(B, X[:, :5], 2)


# ---------------------------------------------------------------- pgrec import embeddings (the foundation's path)


def _items(db: TestDB, n: int = 3) -> None:
    for i in range(n):
        db.conn.execute("SELECT pgrec.upsert_item(%s, ARRAY['x'])", (f"it{i}",))


def test_import_embeddings_csv_jsonl_npy(db: TestDB, tmp_path: Path) -> None:
    _items(db)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, TEST_DIM))
    csv_path = tmp_path / "v.csv"
    csv_path.write_text("id," + ",".join(f"v{k}" for k in range(TEST_DIM)) + "\n" + "".join(
        f"it{i}," + ",".join(repr(float(x)) for x in vecs[i]) + "\n" for i in range(3)))
    assert ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(csv_path), source="csv") == 3
    got = np.array(db.scalar("SELECT embedding::real[] FROM pgrec.item_embeddings e JOIN pgrec.items i "
                             "USING (item_key) WHERE item_id = 'it1'"))
    assert np.allclose(got, vecs[1], atol=1e-6)
    jl = tmp_path / "v.jsonl"
    jl.write_text("".join(json.dumps({"id": f"it{i}", "vector": (vecs[i] * 2).tolist()}) + "\n" for i in range(3)))
    ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(jl), model_version="jl")
    assert db.scalar("SELECT count(*) FROM pgrec.item_embeddings WHERE model_version = 'jl'") == 3
    npy = tmp_path / "v.npy"
    np.save(npy, (vecs * 3).astype(np.float32))
    (tmp_path / "v.ids.txt").write_text("it0\nit1\nit2\n")
    ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(npy), model_version="npy")
    got = np.array(db.scalar("SELECT embedding::real[] FROM pgrec.item_embeddings e JOIN pgrec.items i "
                             "USING (item_key) WHERE item_id = 'it2'"))
    assert np.allclose(got, vecs[2] * 3, atol=1e-5)


def test_import_embeddings_rejects_bad_rows_and_stores_nothing(db: TestDB, tmp_path: Path) -> None:
    _items(db)
    good = ",".join(["0.5"] * TEST_DIM)
    cases = {
        "dim.csv": (f"it0,{good}\nit1,{','.join(['0.5'] * (TEST_DIM - 1))}\n", "has 15 dimensions, expected 16"),
        "nan.csv": (f"it0,{good}\nit1,nan,{','.join(['0.5'] * (TEST_DIM - 1))}\n", "NaN"),
        "unknown.csv": (f"it0,{good}\nnope,{good}\n", "line 2, field id: unknown item 'nope'"),
        "text.csv": (f"it0,{good}\nit1,abc,{good}\n", "line 2, field vector: not a number"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ingest.ImportFailed, match=message):
            ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(path), source=name)
    bad_npy = tmp_path / "bad.npy"
    np.save(bad_npy, np.ones((2, TEST_DIM)))
    (tmp_path / "bad.ids.txt").write_text("it0\n")
    with pytest.raises(ValueError, match="2 vectors but 1 ids"):
        ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(bad_npy))
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"id": "ghost", "vector": [0.5] * TEST_DIM}) + "\n")
    with pytest.raises(ingest.ImportFailed, match="unknown user 'ghost'"):
        ingest.import_embeddings(db.conn, "users", ingest.read_embeddings(users))
    assert db.scalar("SELECT count(*) FROM pgrec.item_embeddings") == 0
    assert db.scalar("SELECT count(*) FROM pgrec.user_embeddings") == 0


def test_bulk_vector_import_builds_the_index_after_the_load(db: TestDB) -> None:
    _items(db)
    index_def = "SELECT indexdef FROM pg_indexes WHERE schemaname = 'pgrec' AND indexname = 'item_embeddings_hnsw'"
    before = db.scalar(index_def)
    ids = [r[0] for r in db.conn.execute("SELECT item_id FROM pgrec.items ORDER BY item_key").fetchall()]
    rng = np.random.default_rng(1)
    rows = [(n + 1, i, rng.normal(size=TEST_DIM).tolist()) for n, i in enumerate(ids)]
    # a bad vector in a bulk load: refused by name, the index and the table as they were
    bad = [*rows[:-1], (len(rows), rows[-1][1], [float("nan")] * TEST_DIM)]
    with pytest.raises(ingest.ImportFailed, match="NaN"):
        ingest.import_embeddings(db.conn, "items", bad, bulk_index_rows=2)
    assert db.scalar(index_def) == before and db.scalar("SELECT count(*) FROM pgrec.item_embeddings") == 0
    # a bulk load into an empty table: the index is dropped and built again after the merge, the same one
    assert ingest.import_embeddings(db.conn, "items", rows, bulk_index_rows=2) == len(ids)
    assert db.scalar(index_def) == before
    q = rows[0][2]
    db.conn.execute("SET enable_seqscan = off")
    plan = "\n".join(r[0] for r in db.conn.execute(
        "EXPLAIN SELECT item_key FROM pgrec.item_embeddings ORDER BY embedding OPERATOR(public.<=>) %s::real[]::public.vector LIMIT 3",
        (q,)).fetchall())
    assert "item_embeddings_hnsw" in plan
    top = db.scalar("SELECT i.item_id FROM pgrec.item_embeddings e JOIN pgrec.items i USING (item_key) "
                    "ORDER BY e.embedding OPERATOR(public.<=>) %s::real[]::public.vector LIMIT 1", (q,))
    assert top == rows[0][1]
    db.conn.execute("RESET enable_seqscan")
    # a smaller import into a filled table keeps the live index (no rebuild)
    oid = db.scalar("SELECT 'pgrec.item_embeddings_hnsw'::regclass::oid")
    ingest.import_embeddings(db.conn, "items", rows[:2], bulk_index_rows=2)
    assert db.scalar("SELECT 'pgrec.item_embeddings_hnsw'::regclass::oid") == oid
