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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as psql
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine import datasets, migrate
from engine.config import Settings
from engine.db import connect, database_url, is_embedded
from engine.errors import InvalidRequest
from engine.ranking.features import serving_count
from engine.sql import query

METRIC_COLUMNS = ("ndcg@10", "recall@10", "recall@50", "map@10", "coverage@10", "diversity@10")


@dataclass(frozen=True)
class DemoConfig:
    movielens: Path | None = None        # a MovieLens folder instead of synthetic data
    users: int = 1_000                   # synthetic sizes: small enough for a few minutes on 2 cores
    items: int = 500
    events: int = 30_000
    days: int = 60
    out_dir: Path = Path("out/demo")     # report.html (the offline evaluation) and demo.html (the lists)
    database: str = "pgrec_demo"         # on the embedded server; dropped and made again by every run
    show_users: int = 3
    seed: int = 7
    ranker_trees: int = 100              # a compact ranker: the SQL path evaluates every tree per candidate
    # replaying the past costs one candidates + features call per user and cutoff: these keep the demo short
    eval_users: int = 100                # evaluate a seeded sample of the test users
    ranker_cutoffs: int = 1              # replay cutoffs for the ranker's training data (plus one to validate)
    ranker_users: int = 100              # users sampled per cutoff
    retrieval_epochs: int = 10
    command: str = "pgrec demo"


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
    from engine import cooccurrence, itemsim, policies
    from engine.evaluation import funnel
    from engine.pipeline import Recommender
    from engine.ranking.compile import install_compiled_model
    from engine.ranking.train import RankerConfig

    retrieval = _optional("engine.retrieval.store")
    step = _Step(0, 6, console, {})
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
            else:
                data = datasets.generate(datasets.GeneratorConfig(users=cfg.users, items=cfg.items,
                                                                  events=cfg.events, seed=cfg.seed, days=cfg.days,
                                                                  dim=settings.embedding_dim))
                data.load(conn)
                console.print(f"synthetic: {len(data.items):,} items, {len(data.users):,} users, "
                              f"{len(data.events):,} events (taste clusters, local hits, dislikes, new items)")
            conn.execute("ANALYZE")

        with step("evaluation on a temporal split: the funnel against the baselines"):
            # the evaluated ranker is the one served next: it ranks the serving count of candidates
            serving_n = serving_count(conn)
            ecfg = funnel.EvalConfig(max_users=cfg.eval_users, seed=cfg.seed, candidate_counts=(50, 100, 200),
                                     n_candidates=serving_n,
                                     ranker=RankerConfig(num_boost_round=cfg.ranker_trees, cutoffs=cfg.ranker_cutoffs,
                                                         max_users_per_cutoff=cfg.ranker_users))
            with _progress(console) as progress:
                report, trained = funnel.run(conn, ecfg, progress=progress)
            out["evaluation"] = report.as_dict()
            _print_metrics(console, report)

        with step("models for serving: ranker (compiled to SQL), co-occurrence, retrieval"):
            version = trained.save(conn, activate=True)
            compiled = install_compiled_model(conn, version)
            out["model_version"] = version
            console.print(f"ranker version {version}: {compiled.num_trees} trees over {len(trained.names)} "
                          f"features, active; pgrec.{compiled.function_name} for the SQL path")
            r = cooccurrence.build(conn)
            console.print(f"co-occurrence on every event: {r.pairs:,} pairs, neighbours for {r.items:,} items")
            e = itemsim.build_ease(conn)  # the evaluation left the EASE neighbours as of its split
            console.print(f"EASE neighbours on every event: {e.rows:,} pairs over {e.items:,} items")
            if retrieval is not None and hasattr(retrieval, "train_and_store"):
                from engine.retrieval.train import RetrievalConfig

                stored = retrieval.train_and_store(conn, RetrievalConfig(dim=settings.embedding_dim,
                                                                         epochs=cfg.retrieval_epochs))
                console.print(f"retrieval model v{getattr(stored, 'version', '?')}: {getattr(stored, 'items', 0):,} "
                              f"item and {getattr(stored, 'users', 0):,} user vectors (ann source)")
            elif cfg.movielens is not None:
                console.print("[yellow]no retrieval trainer in this checkout and MovieLens has no item vectors: "
                              "the ann source stays empty[/]")
            policies.add(conn, "exclude-seen", "exclude_interacted", {}, priority=10, actor="pgrec demo",
                         description="items the user already had an event with are not recommended again")
            console.print("policies: exclude-disliked (seeded), exclude-seen (added by the demo)")

        with step("recommendations"):
            users = [u[0] for u in conn.execute(query("serving.sample_users"), {"n": 200}).fetchall()]
            shown = users[:: max(1, len(users) // cfg.show_users)][: cfg.show_users]
            lists = []
            with Recommender(settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 2})) as rec:
                now = datetime.now(UTC)
                for u in shown:
                    r_ = rec.recommend(u, k=10, as_of=now, log=False)
                    lists.append(r_)
                    _print_list(console, r_)
            sql_rows = conn.execute(query("serving.recommend_sql"), {
                "user_id": shown[0], "k": 10, "surface": "default", "context": "{}", "as_of": now,
                "model_version": None, "policy_set": None, "variant": None, "log": False}).fetchall()
            same = [(x[2], round(x[3], 9)) for x in sql_rows] == [(i.item_id, round(i.score, 9))
                                                                  for i in lists[0].items]
            console.print(f"SQL-only path (pgrec.recommend) for {shown[0]}: "
                          + ("[green]the same list and scores[/]" if same else "[red]a different list[/]"))
            out["lists"] = [{"user_id": x.user_id, "items": [(i.item_id, i.score) for i in x.items]} for x in lists]
            out["sql_path_same"] = same

        with step("HTML report"):
            from engine.evaluation import report as eval_report

            paths = eval_report.write(report, cfg.out_dir, command=cfg.command)
            page = _report(cfg.out_dir / "demo.html", out, lists, report)
            out["report"] = str(paths["html"])
            console.print(f"evaluation report: {paths['html']}; recommendations and timings: {page}")
    finally:
        conn.close()
    total = time.perf_counter() - t_start
    out["total_s"] = total
    console.print(f"[bold green]demo finished in {total:.0f}s.[/] Explore it: "
                  + (f"export PGREC_DATABASE_NAME={settings.database_name}; " if is_embedded(settings) else "")
                  + f"pgrec recommend {shown[0]}")
    return out


@contextmanager
def _progress(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    tasks: dict[str, TaskID] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    with bar:
        yield update


def _print_metrics(console: Console, report: Any) -> None:
    t = Table(title=f"offline evaluation: {report.split.get('users')} users with new items after "
                    f"{str(report.split.get('cutoff'))[:16]}")
    cols = METRIC_COLUMNS
    t.add_column("method", no_wrap=True)
    for c in cols:
        t.add_column(c, justify="right")
    for name, vals in sorted(report.methods.items(), key=lambda kv: -kv[1].get("ndcg@10", 0.0)):
        t.add_row(f"[bold]{name}[/]" if name == "funnel" else name,
                  *(f"{vals[c]:.4f}" if c in vals else "" for c in cols))
    console.print(t)
    best, value = report.best_baseline()
    f = report.methods.get("funnel", {}).get("ndcg@10", 0.0)
    console.print(f"funnel NDCG@10 {f:.4f} vs best baseline ({best}) {value:.4f}"
                  + (f": {f / value:.2f}x" if value else ""))
    for note in report.notes:
        console.print(f"[dim]note: {note}[/]")


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
        if value in (None, "", [], {}):
            continue
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            value = ",".join(f"{k}" for k in value)
        parts.append(f"{key}: {value}")
    return "; ".join(parts)[:90]


def _report(path: Path, out: dict[str, Any], lists: list[Any], report: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    esc = html.escape
    head = ("<tr><th>method</th>" + "".join(f"<th>{esc(c)}</th>" for c in METRIC_COLUMNS) + "</tr>")
    rows = "".join(
        f"<tr><td>{esc(n)}</td>" + "".join(f"<td>{v.get(c, float('nan')):.4f}</td>" for c in METRIC_COLUMNS) + "</tr>"
        for n, v in sorted(report.methods.items(), key=lambda kv: -kv[1].get("ndcg@10", 0.0)))
    rvc = report.recall_vs_candidates
    body = [f"<h1>pgrec demo</h1><p>{esc(datetime.now(UTC).isoformat(timespec='seconds'))}; split at "
            f"{esc(str(report.split.get('cutoff')))}; {esc(str(report.split.get('users')))} test users; ranker "
            f"version {esc(str(out.get('model_version')))}</p>",
            f"<h2>Offline evaluation</h2><table>{head}{rows}</table>",
            "<h2>Recall of the candidate union (seen items excluded)</h2><table><tr><th>candidates</th>"
            "<th>recall</th></tr>" + "".join(f"<tr><td>{int(n)}</td><td>{r:.4f}</td></tr>"
                                            for n, r in zip(rvc.get("n", []), rvc.get("recall", []), strict=False))
            + "</table>",
            "<h2>Feature importance (gain)</h2><table>" + "".join(
                f"<tr><td>{esc(k)}</td><td>{v:.1f}</td></tr>"
                for k, v in sorted(report.importance.items(), key=lambda kv: -kv[1])[:20]) + "</table>",
            "<h2>Time per step</h2><table>" + "".join(
                f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in out["seconds"].items()) + "</table>"]
    for r in lists:
        body.append(f"<h2>Recommendations for {esc(r.user_id)}</h2><table><tr><th>#</th><th>item</th><th>score</th>"
                    "<th>why</th></tr>" + "".join(
                        f"<tr><td>{i.position}</td><td>{esc(i.item_id)}</td><td>{i.score:.4f}</td>"
                        f"<td>{esc(_why(i.reasons))}</td></tr>" for i in r.items) + "</table>")
    if report.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report.notes) + "</ul>")
    body.append('<p>The full offline evaluation with plots: <a href="report.html">report.html</a></p>')
    path.write_text("<!doctype html><meta charset=utf-8><title>pgrec demo</title><style>body{font-family:sans-serif;"
                    "max-width:60em;margin:2em auto}table{border-collapse:collapse}td,th{padding:2px 10px;"
                    "text-align:right;border-bottom:1px solid #ddd}td:first-child,th:first-child{text-align:left}"
                    "</style>" + "".join(body))
    return path
