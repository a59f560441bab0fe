"""Training speed of the two-tower model: seconds to the best validation epoch on generated data."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from datetime import datetime

from engine import datasets
from engine.retrieval.data import RetrievalData, item_tokens
from engine.retrieval.train import EpochStats, RetrievalConfig, train

# the default event types of the core migration: name -> (weight, polarity)
EVENT_TYPES = {"view": (1.0, 1), "click": (2.0, 1), "like": (4.0, 1), "purchase": (8.0, 1), "dislike": (4.0, -1)}


def synthetic_data(events: int, users: int, items: int, seed: int = 11) -> RetrievalData:
    """Generated events turned straight into training arrays (the database is not part of this timing)."""
    data = datasets.generate(datasets.GeneratorConfig(users=users, items=items, events=events, seed=seed))
    keys = {it["item_id"]: n for n, it in enumerate(data.items)}
    ukeys = {u["user_id"]: n for n, u in enumerate(data.users)}
    ev = data.events
    w = [EVENT_TYPES[e["event_type"]] for e in ev]
    return RetrievalData.from_arrays(
        list(range(len(data.items))), [item_tokens(it["categories"], it["properties"]) for it in data.items],
        [ukeys[e["user_id"]] for e in ev], [keys[e["item_id"]] for e in ev], [p for _, p in w],
        [x for x, _ in w], [datetime.fromisoformat(e["occurred_at"]).timestamp() for e in ev],
        item_created=[datetime.fromisoformat(it["created_at"]).timestamp() for it in data.items],
        user_properties={n: u.get("properties") for n, u in enumerate(data.users)},  # the user tower's features
    )


def run(*, events: int, users: int, items: int, dim: int, epochs: int) -> Iterator[str]:
    load = os.getloadavg()
    yield (f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
           f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', '?')}, load average {load[0]:.1f} / {load[1]:.1f}")
    t0 = time.perf_counter()
    data = synthetic_data(events, users, items)
    yield (f"generated {len(data.ev_time):,} events, {data.n_users:,} users, {data.n_items:,} items "
           f"({sum(1 for t in data.user_tokens if t)} users with property tokens) in {time.perf_counter() - t0:.1f}s")
    lines: list[str] = []

    def on_epoch(s: EpochStats, batches: int) -> None:
        val = f", val recall@100 {s.val_recall:.4f}" if s.val_recall is not None else ""
        lines.append(f"  {s.phase} epoch {s.epoch}: loss {s.loss:.4f}{val}, {s.seconds:.1f}s since start")
        print(lines[-1], flush=True)

    cfg = RetrievalConfig(dim=dim, epochs=epochs)
    r = train(data, cfg, on_epoch=on_epoch)
    fit_epochs = sum(1 for e in r.epochs if e.phase == "fit")
    yield (f"pairs {r.pairs:,}; best epoch {r.best_epoch} (val recall@100 {r.best_val_recall:.4f}) reached after "
           f"{r.seconds_to_best:.1f}s; {fit_epochs} epochs with validation "
           f"({r.seconds_to_best / max(1, r.best_epoch):.1f}s per epoch); total with refit {r.seconds_total:.1f}s")
    load = os.getloadavg()
    yield f"load average after: {load[0]:.1f} / {load[1]:.1f} (2 cores shared: numbers are noisy)"
