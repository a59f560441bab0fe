"""The synthetic generator and the MovieLens loader."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import TestDB, dataset_dir

from engine import datasets, ingest

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_generator_is_deterministic_and_planted() -> None:
    cfg = datasets.GeneratorConfig(users=300, items=200, events=6000, seed=3, dim=16)
    a = datasets.generate(cfg, now=NOW)
    b = datasets.generate(cfg, now=NOW)
    assert a.events == b.events and a.items == b.items
    # users mostly pick items of their own planted cluster
    cluster_of_item = {it["item_id"]: a.item_cluster[n] for n, it in enumerate(a.items)}
    own = [cluster_of_item[e["item_id"]] == a.user_cluster[int(e["user_id"][1:])]
           for e in a.events if e["event_type"] != "dislike"]
    assert np.mean(own) > 0.75
    dislikes = [e for e in a.events if e["event_type"] == "dislike"]
    assert dislikes and all(cluster_of_item[e["item_id"]] != a.user_cluster[int(e["user_id"][1:])] for e in dislikes)
    # no event happens before its item exists
    created = {it["item_id"]: it["created_at"] for it in a.items}
    assert all(datetime.fromisoformat(e["occurred_at"]) >= datetime.fromisoformat(created[e["item_id"]])
               for e in a.events)


def test_generated_files_import_cleanly(db: TestDB, tmp_path: Path) -> None:
    data = datasets.generate(datasets.GeneratorConfig(users=100, items=80, events=1500, dim=16), now=NOW)
    paths = data.write(tmp_path)
    assert ingest.import_file(db.conn, "items", paths["items"]).stored == 80
    assert ingest.import_file(db.conn, "users", paths["users"]).stored == 100
    assert ingest.import_file(db.conn, "events", paths["events"]).stored == len(data.events)
    n = ingest.import_embeddings(db.conn, "items", ingest.read_embeddings(paths["embeddings"]))
    assert n == 80
    assert db.scalar("SELECT count(*) FROM pgrec.users WHERE properties ? 'country'") == 100


@pytest.mark.datasets
def test_movielens_100k(db: TestDB) -> None:
    path = dataset_dir("ml-100k")
    out = datasets.load_movielens(db.conn, path)
    assert out["events"].stored == 100_000
    assert db.scalar("SELECT count(*) FROM pgrec.users") == 943
    assert db.scalar("SELECT properties->>'title' FROM pgrec.items WHERE item_id = '1'") == "Toy Story"
    assert db.scalar("SELECT categories FROM pgrec.items WHERE item_id = '1'") == ["Animation", "Children's", "Comedy"]
    assert db.scalar("SELECT properties->>'occupation' FROM pgrec.users WHERE user_id = '1'") == "technician"
    pos = db.scalar("SELECT count(*) FROM pgrec.events WHERE polarity = 1")
    neg = db.scalar("SELECT count(*) FROM pgrec.events WHERE polarity = -1")
    assert (pos, neg) == (55_375, 17_480)  # ratings >= 4 and <= 2 in ml-100k
    # importing again changes nothing
    assert datasets.load_movielens(db.conn, path)["events"].stored == 0


@pytest.mark.datasets
def test_movielens_latest_small_tags(db: TestDB) -> None:
    path = dataset_dir("ml-latest-small")
    ml = datasets.read_movielens(path)
    assert len(ml.events) == 100_836
    tagged = [it for it in ml.items if it["properties"].get("tags")]
    assert tagged and all(isinstance(t, str) for t in tagged[0]["properties"]["tags"])
