"""``pgrec demo``: the whole funnel on a fresh machine, with progress along the way.

A database of its own (``pgrec_demo`` on the embedded server; with ``PGREC_DATABASE_URL``, that database, which
must not hold pgrec data yet), synthetic data (or MovieLens), every model trained on the events before a
temporal cutoff, the funnel evaluated after it against the baselines, a few users' recommendations with their
reasons from both serving paths, and an HTML report.
"""

from __future__ import annotations

import html
import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as psql
from rich.console import Console
from rich.table import Table

from engine import datasets, migrate
from engine.config import Settings
from engine.db import connect, database_url, is_embedded
from engine.errors import InvalidRequest
from engine.sql import query


@dataclass(frozen=True)
class DemoConfig:
    movielens: Path | None = None        # a MovieLens folder instead of synthetic data
    users: int = 1_500                   # synthetic sizes: small enough for a few minutes on 2 cores
    items: int = 1_000
    events: int = 60_000
    report: Path = Path("out/demo/report.html")
    database: str = "pgrec_demo"         # on the embedded server; dropped and made again by every run
    show_users: int = 3
    seed: int = 7
    ranker_trees: int = 150              # a compact ranker: the SQL path evaluates every tree per candidate


@dataclass
class _Step:
    n: int
    total: int
    console: Console
    seconds: dict[str, float]

    @contextmanager
    def __call__(self, title: str) -> Iterator[None]:
        self.n += 1
        self.console.rule(f"[bold]{self.n}/{self.total} {title}", align="left")
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.seconds[title] = dt
        self.console.print(f"[green]done[/] in {dt:.1f}s")


def _optional(module: str) -> Any | None:
    """A part of pgrec that may not be installed in this checkout yet."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _fresh_database(settings: Settings, name: str) -> Settings:
    if not is_embedded(settings):
        s = settings
        with connect(s) as conn:
            has = conn.execute("SELECT to_regclass('pgrec.items') IS NOT NULL").fetchone()
            if has and has[0] and conn.execute("SELECT count(*) FROM pgrec.items").fetchone() != (0,):
                raise InvalidRequest("the demo needs an empty database: PGREC_DATABASE_URL already holds pgrec data "
                                     "(unset it to use the embedded server)")
        return s
    s = settings.model_copy(update={"database_name": name})
    admin = database_url(settings.model_copy(update={"database_name": "postgres"}))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(name)))
    return s


def run(settings: Settings, cfg: DemoConfig, console: Console) -> dict[str, Any]:
    """Run the demo; returns what it measured (metrics, timings, the lists shown)."""
    from engine import cooccurrence
    from engine.evaluation.split import resolve_cutoff
    from engine.pipeline import Recommender
    from engine.ranking.compile import install_compiled_model
    from engine.ranking.train import RankerConfig, train_ranker

    funnel = _optional("engine.evaluation.funnel")
    retrieval = _optional("engine.retrieval.store")
    step = _Step(0, 8, console, {})
    out: dict[str, Any] = {"seconds": step.seconds}
    t_start = time.perf_counter()

    with step("database"):
        settings = _fresh_database(settings, cfg.database)
        migrate.upgrade(settings)
        console.print(f"schema at {migrate.current(settings)} in database {settings.database_name!r}"
                      if is_embedded(settings) else "schema installed in PGREC_DATABASE_URL")
    conn = connect(settings)
    try:
        with step("data"):
            if cfg.movielens is not None:
                res = datasets.load_movielens(conn, cfg.movielens)
                console.print(", ".join(f"{k}: {r.stored:,}" for k, r in res.items()) + f" from {cfg.movielens}")
                console.print("[yellow]MovieLens has no item vectors: the ann source starts once the retrieval "
                              "model has been trained[/]")
            else:
                data = datasets.generate(datasets.GeneratorConfig(users=cfg.users, items=cfg.items,
                                                                  events=cfg.events, seed=cfg.seed,
                                                                  dim=settings.embedding_dim))
                data.load(conn)
                console.print(f"synthetic: {len(data.items):,} items, {len(data.users):,} users, "
                              f"{len(data.events):,} events (taste clusters, local hits, dislikes, new items)")
            conn.execute("ANALYZE")
            cutoff = resolve_cutoff(conn, None, 0.1)
            out["cutoff"] = cutoff.isoformat()
            console.print(f"temporal split: models learn from events before {cutoff:%Y-%m-%d %H:%M}, "
                          "the evaluation looks after it")

        with step("co-occurrence neighbours (history source)"):
            r = cooccurrence.build(conn, as_of=cutoff)
            console.print(f"{r.pairs:,} pairs, neighbours for {r.items:,} items")

        with step("retrieval model (two-tower, ann source)"):
            if retrieval is not None and hasattr(retrieval, "train_and_store"):
                info = retrieval.train_and_store(conn, as_of=cutoff)
                console.print(str(info))
            else:
                console.print("[yellow]the retrieval trainer is not in this checkout: the ann source uses the "
                              "item vectors that came with the data[/]")

        with step("ranker (LightGBM lambdarank), compiled to SQL"):
            trained = train_ranker(conn, RankerConfig(num_boost_round=cfg.ranker_trees), until=cutoff)
            version = trained.save(conn, activate=True)
            compiled = install_compiled_model(conn, version)
            m = {k: v for k, v in trained.metrics.items() if isinstance(v, int | float)}
            console.print(f"model version {version}: {compiled.num_trees} trees over {len(trained.names)} features; "
                          + ", ".join(f"{k} {v:.4g}" for k, v in m.items()))
            out["model_version"] = version

        with step("evaluation against the baselines"):
            if funnel is not None and hasattr(funnel, "evaluate_funnel"):
                result = funnel.evaluate_funnel(conn, cutoff=cutoff)
                out["evaluation"] = result
                _print_metrics(console, result)
            else:
                console.print("[yellow]the funnel evaluation is not in this checkout yet[/]")

        with step("recommendations"):
            users = [u[0] for u in conn.execute(query("serving.sample_users"), {"n": 200}).fetchall()]
            shown = users[:: max(1, len(users) // cfg.show_users)][: cfg.show_users]
            lists = []
            with Recommender(settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 2})) as rec:
                for u in shown:
                    r_ = rec.recommend(u, k=10, log=False)
                    lists.append(r_)
                    _print_list(console, r_)
                sql_rows = conn.execute(query("serving.recommend_sql"), {
                    "user_id": shown[0], "k": 10, "surface": "default", "context": "{}", "as_of": None,
                    "model_version": None, "policy_set": None, "variant": None, "log": False}).fetchall()
            same = [x[2] for x in sql_rows] == [i.item_id for i in lists[0].items]
            console.print(f"SQL-only path (pgrec.recommend) for {shown[0]}: "
                          + ("[green]the same list[/]" if same else "[red]a different list[/]"))
            out["lists"] = [{"user_id": x.user_id, "items": [(i.item_id, i.score) for i in x.items]} for x in lists]
            out["sql_path_same"] = same

        with step("HTML report"):
            path = _report(cfg.report, out, lists, funnel)
            console.print(f"written to {path}")
    finally:
        conn.close()
    total = time.perf_counter() - t_start
    console.print(f"[bold green]demo finished in {total:.0f}s.[/] Explore it: "
                  + (f"export PGREC_DATABASE_NAME={settings.database_name}; " if is_embedded(settings) else "")
                  + f"pgrec recommend {shown[0]}")
    return out


def _print_metrics(console: Console, result: Any) -> None:
    rows = getattr(result, "rows", None) or (result.get("rows") if isinstance(result, dict) else None) or []
    if not rows:
        console.print(str(result))
        return
    cols = list(rows[0].keys())
    t = Table(title="offline evaluation after the cutoff")
    for c in cols:
        t.add_column(str(c), justify="left" if c == cols[0] else "right")
    for r in rows:
        t.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()))
    console.print(t)


def _print_list(console: Console, r: Any) -> None:
    t = Table(title=f"{r.user_id}: model {r.model_version}, {r.timings_ms.get('total', 0):.1f} ms")
    for c in ("#", "item", "score", "why"):
        t.add_column(c, justify="right" if c in ("#", "score") else "left")
    for it in r.items:
        t.add_row(str(it.position), it.item_id, f"{it.score:.3f}", _why(it.reasons))
    console.print(t)


def _why(reasons: dict[str, Any]) -> str:
    parts = []
    for key, value in reasons.items():
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            value = ",".join(f"{k}" for k in value)
        parts.append(f"{key}: {value}")
    return "; ".join(parts)[:90]


def _report(path: Path, out: dict[str, Any], lists: list[Any], funnel: Any | None) -> Path:
    writer: Callable[..., Path] | None = getattr(funnel, "write_report", None) if funnel is not None else None
    if writer is not None and "evaluation" in out:
        return writer(out["evaluation"], path)
    path.parent.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    body = [f"<h1>pgrec demo</h1><p>{esc(datetime.now().isoformat(timespec='seconds'))}; cutoff "
            f"{esc(str(out.get('cutoff')))}; ranker version {esc(str(out.get('model_version')))}</p>",
            "<h2>Time per step</h2><table>" + "".join(
                f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in out["seconds"].items()) + "</table>"]
    for r in lists:
        body.append(f"<h2>{esc(r.user_id)}</h2><table><tr><th>#</th><th>item</th><th>score</th><th>why</th></tr>"
                    + "".join(f"<tr><td>{i.position}</td><td>{esc(i.item_id)}</td><td>{i.score:.4f}</td>"
                              f"<td>{esc(_why(i.reasons))}</td></tr>" for i in r.items) + "</table>")
    path.write_text("<!doctype html><meta charset=utf-8><title>pgrec demo</title><style>body{font-family:sans-serif}"
                    "td,th{padding:2px 8px;text-align:left}</style>" + "".join(body))
    return path
