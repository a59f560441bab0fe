"""How many candidates to retrieve: recall of each source and of their union at several n, on a temporal split.

For the users with new positive items after the cutoff (items they had no event with before it), each source
and the union are asked as of the cutoff; items the user had seen before the cutoff are dropped from every
list; recall@n = share of the user's future positive items among the first n (``full_recall_at_k``).
The co-occurrence table is rebuilt as of the cutoff inside a transaction that is rolled back at the end, so the
live neighbours are untouched (readers of pgrec.item_neighbors wait while the evaluation runs).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from rich.table import Table

from engine import candidates, cooccurrence
from engine.evaluation.metrics import full_recall_at_k
from engine.evaluation.split import resolve_cutoff, temporal_split
from engine.sql import query

Progress = Callable[[int, int], None]


class _Rollback(Exception):
    pass


def run(conn: psycopg.Connection[Any], *, split_at: datetime | None = None, split_fraction: float | None = None,
        ns: list[int] | None = None, surface: str = "default", max_users: int | None = None, seed: int = 0,
        progress: Progress | None = None) -> dict[str, Any]:
    """Recall per source and for the union at each n. Returns the report (see :func:`save`)."""
    sizes = sorted(ns or [50, 100, 200, 500, 1000])
    cutoff = resolve_cutoff(conn, split_at, split_fraction)
    report: dict[str, Any] = {}
    notes = _vector_notes(conn, cutoff)
    try:
        with conn.transaction():
            build = cooccurrence.build(conn, as_of=cutoff)
            split = temporal_split(conn, cutoff)
            users = split.users
            if max_users is not None and len(users) > max_users:
                users = sorted(random.Random(seed).sample(users, max_users))
            per_source: dict[str, dict[int, list[float]]] = {s: {n: [] for n in sizes} for s in candidates.SOURCES}
            union: dict[int, list[float]] = {n: [] for n in sizes}
            union_rows: dict[int, list[int]] = {n: [] for n in sizes}
            params = {s: p["params"] for s, p in candidates.source_params(conn, surface).items()}
            for done, uk in enumerate(users, start=1):
                truth, seen = split.truth[uk], split.seen.get(uk, set())
                for s in candidates.SOURCES:
                    rows = candidates.run_source(conn, s, uk, min(10_000, sizes[-1] + len(seen)), as_of=cutoff,
                                                 params=params.get(s, {}))
                    ranked = [r.item_key for r in rows if r.item_key not in seen]
                    for n in sizes:
                        per_source[s][n].append(full_recall_at_k(ranked, truth, n))
                for n in sizes:
                    got = candidates.candidates_by_key(conn, uk, n=n, surface=surface, as_of=cutoff)
                    ranked = [c.item_key for c in got if c.item_key not in seen]
                    union[n].append(full_recall_at_k(ranked, truth, n))
                    union_rows[n].append(len(ranked))
                if progress:
                    progress(done, len(users))
            report = {
                "cutoff": cutoff.isoformat(),
                "surface": surface,
                "users": len(users),
                "users_in_split": len(split.users),
                "mean_future_items": float(np.mean([len(split.truth[u]) for u in users])) if users else 0.0,
                "cooccurrence": {"pairs": build.pairs, "items": build.items},
                "item_embeddings": int(conn.execute("SELECT count(*) FROM pgrec.item_embeddings").fetchone()[0]),  # type: ignore[index]
                "ns": sizes,
                "recall": {s: {str(n): _mean(v) for n, v in by_n.items()} for s, by_n in per_source.items()},
                "union": {str(n): _mean(v) for n, v in union.items()},
                "union_mean_unseen_rows": {str(n): _mean([float(x) for x in v]) for n, v in union_rows.items()},
                "notes": notes,
            }
            raise _Rollback
    except _Rollback:
        pass
    return report


def _vector_notes(conn: psycopg.Connection[Any], cutoff: datetime) -> list[str]:
    """Co-occurrence is rebuilt as of the split here; the item vectors are not (training them is `pgrec train
    retrieval --as-of`): say when they saw the test window, which makes ann (and the history source's
    embedding neighbours) look better than they are."""
    row = conn.execute(query("evaluation.active_retrieval_window")).fetchone()
    fix = f"`pgrec train retrieval --as-of {cutoff.isoformat()}` first"
    if row is not None and row[1] is not None and row[1] >= cutoff:
        return [f"the item vectors come from retrieval model v{row[0]}, trained on events up to "
                f"{row[1].isoformat()}, after the split: the ann source (and the history source's embedding "
                f"neighbours) saw the test window, so their recall is optimistic; run {fix}"]
    if row is None and conn.execute(query("evaluation.any_item_vector")).fetchone() is not None:
        return ["the item vectors were not trained by pgrec (imported or generated): if they were fit on events "
                f"after the split, the ann source's recall is optimistic; to be sure, run {fix}"]
    return []


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def table(report: dict[str, Any]) -> Table:
    t = Table(title=f"candidate recall as of {report['cutoff']} ({report['users']} users, "
                    f"{report['mean_future_items']:.1f} future items each)")
    t.add_column("source")
    for n in report["ns"]:
        t.add_column(f"@{n}", justify="right")
    for s, by_n in report["recall"].items():
        t.add_row(s, *(f"{by_n[str(n)]:.3f}" for n in report["ns"]))
    t.add_row("[bold]union[/]", *(f"[bold]{report['union'][str(n)]:.3f}[/]" for n in report["ns"]))
    return t


def markdown(report: dict[str, Any]) -> str:
    ns = report["ns"]
    lines = ["| source | " + " | ".join(f"@{n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    for s, by_n in report["recall"].items():
        lines.append(f"| {s} | " + " | ".join(f"{by_n[str(n)]:.3f}" for n in ns) + " |")
    lines.append("| **union** | " + " | ".join(f"**{report['union'][str(n)]:.3f}**" for n in ns) + " |")
    return "\n".join(lines)


def save(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write candidates_recall.json, .md (the table) and .png (recall against n, one line per source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "candidates_recall.json", "md": out / "candidates_recall.md",
             "png": out / "candidates_recall.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["md"].write_text(f"Candidate recall as of {report['cutoff']} ({report['users']} users)\n\n"
                           + markdown(report) + "\n" + "".join(f"\nNote: {n}\n" for n in report.get("notes", [])))
    ns = report["ns"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, by_n in report["recall"].items():
        ax.plot(ns, [by_n[str(n)] for n in ns], marker="o", label=s)
    ax.plot(ns, [report["union"][str(n)] for n in ns], marker="s", linewidth=2.5, color="black", label="union")
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("n (candidates per user)")
    ax.set_ylabel("recall of future positive items")
    ax.set_title(f"candidate recall, split {report['cutoff'][:10]}, {report['users']} users")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
