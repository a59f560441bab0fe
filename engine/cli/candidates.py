"""CLI commands for candidates (registered on the groups of engine.cli.app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from engine import candidates, cooccurrence, neighbors
from engine.cli.app import AsOf, app, bench_app, console, eval_app, fail, parse_as_of, train_app
from engine.cli.core import db_connection, progress_bar
from engine.errors import InvalidRequest, NotFound


@app.command("candidates")
def candidates_cmd(
    user: Annotated[str, typer.Argument(help="user id (an unknown id is a cold user)")],
    n: Annotated[int, typer.Option("--n", help="how many unseen candidates")] = 500,
    surface: Annotated[str, typer.Option("--surface")] = "default",
    as_of: AsOf = None,
    category: Annotated[list[str] | None, typer.Option("--category", help="restrict to these categories")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    show: Annotated[int, typer.Option("--show", help="rows to print in the table")] = 30,
) -> None:
    """Stage-1 candidates of a user: every source's score and rank."""
    with db_connection() as conn:
        try:
            rows = candidates.candidates(conn, user, n=n, surface=surface, as_of=parse_as_of(as_of),
                                         categories=category or None)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    if as_json:
        print(json.dumps([r.as_dict() for r in rows]))
        return
    counts = {s: sum(1 for r in rows if s in r.sources) for s in candidates.SOURCES}
    t = Table(title=f"candidates for {user} ({len(rows)} rows; " +
              ", ".join(f"{s} {c}" for s, c in counts.items()) + ")")
    t.add_column("item")
    t.add_column("sources")
    for s in candidates.SOURCES:
        t.add_column(f"{s} rank", justify="right")
    for r in rows[:show]:
        t.add_row(r.item_id, ",".join(r.sources), *(str(r.rank(s) or "") for s in candidates.SOURCES))
    console.print(t)


@app.command("similar")
def similar_cmd(
    item: Annotated[str, typer.Argument(help="item id")],
    k: Annotated[int, typer.Option("--k")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Items like ITEM: co-occurrence neighbours plus embedding neighbours."""
    with db_connection() as conn:
        try:
            rows = candidates.similar(conn, item, k)
        except (NotFound, InvalidRequest) as exc:
            raise fail(str(exc)) from None
    if as_json:
        print(json.dumps([{"item_id": i, "score": s, "cooccurrence": c, "embedding": e} for i, s, c, e in rows]))
        return
    t = Table(title=f"items like {item}")
    for col in ("item", "score", "co-occurrence", "embedding"):
        t.add_column(col, justify="left" if col == "item" else "right")
    for i, s, c, e in rows:
        t.add_row(i, f"{s:.3f}", "" if c is None else f"{c:.3f}", "" if e is None else f"{e:.3f}")
    console.print(t)


@app.command("trending")
def trending_cmd(
    segment: Annotated[str | None, typer.Option("--segment", help="a segment value, e.g. a country")] = None,
    k: Annotated[int, typer.Option("--k")] = 20,
    as_of: AsOf = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Trending items (time-decayed positive events), globally or in a segment."""
    with db_connection() as conn:
        try:
            rows = candidates.trending(conn, k, segment, parse_as_of(as_of))
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    if as_json:
        print(json.dumps([{"item_id": i, "score": s} for i, s in rows]))
        return
    t = Table(title="trending" + (f" in {segment}" if segment else ""))
    t.add_column("item")
    t.add_column("score", justify="right")
    for i, s in rows:
        t.add_row(i, f"{s:.3f}")
    console.print(t)


@train_app.command("cooccurrence")
def train_cooccurrence(
    incremental: Annotated[bool, typer.Option("--incremental", help="add events since the last build")] = False,
    as_of: AsOf = None,
    window_hours: Annotated[float | None, typer.Option(help="pair window (config cooccurrence_window_hours)")] = None,
    max_gap: Annotated[int | None, typer.Option(help="max positive items apart (config cooccurrence_max_gap)")] = None,
    top_n: Annotated[int | None, typer.Option(help="neighbours per item (config cooccurrence_top_n)")] = None,
    min_count: Annotated[int | None, typer.Option(help="min pair count (config cooccurrence_min_count)")] = None,
) -> None:
    """Build the item co-occurrence neighbours behind the history source (full, or --incremental)."""
    cfg = cooccurrence.CooccurrenceConfig(window_hours, max_gap, top_n, min_count)
    with db_connection() as conn, progress_bar() as bar:
        task = bar.add_task("co-occurrence pairs", total=None)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = cooccurrence.build(conn, as_of=parse_as_of(as_of), incremental=incremental, config=cfg, progress=step)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    console.print(f"{result.mode} build #{result.build_id} as of {result.as_of.isoformat()}: "
                  f"{result.pairs:,} pairs, neighbours for {result.items:,} items, {result.seconds:.1f}s")


@train_app.command("neighbours")
def train_neighbours(
    k: Annotated[int, typer.Option("--k", help="neighbours stored per item")] = 20,
    stale_only: Annotated[bool, typer.Option("--stale-only", help="only items whose stored list is missing or "
                                                                  "older than their vector")] = False,
) -> None:
    """Store each item's k nearest items by vector (pgrec.model_neighbors 'embedding'): the history source reads
    them instead of searching the HNSW index per seed item. Training the retrieval model does this itself for
    catalogs up to 50,000 items."""
    with db_connection() as conn, progress_bar() as bar:
        task = bar.add_task("embedding neighbours", total=None)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = neighbors.build(conn, k=k, stale_only=stale_only, progress=step)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    console.print(f"embedding neighbours: {result.items:,} items, {result.rows:,} rows in {result.seconds:.1f}s")


@eval_app.command("candidates")
def eval_candidates(
    split_at: Annotated[str | None, typer.Option("--split-at", help="split time (ISO 8601)")] = None,
    split_fraction: Annotated[float | None, typer.Option("--split-fraction", help="split by time at this share of events")] = None,
    ns: Annotated[str, typer.Option("--ns", help="list sizes")] = "50,100,200,500,1000",
    max_users: Annotated[int | None, typer.Option("--max-users", help="evaluate a sample of users")] = None,
    out: Annotated[Path, typer.Option("--output", "--out", help="folder for the JSON, markdown and PNG")] = Path(
        "reports/candidates"),
) -> None:
    """Recall of each candidate source and of the union at several n, on a temporal split."""
    import engine.evaluation.candidates as evaluation

    if split_at is not None and split_fraction is not None:
        raise fail("give --split-at or --split-fraction, not both")
    try:
        sizes = sorted({int(x) for x in ns.split(",") if x.strip()})
    except ValueError:
        raise fail(f"--ns must be a comma-separated list of integers, got {ns!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 10_000:
        raise fail("--ns sizes must be between 1 and 10000")
    with db_connection() as conn, progress_bar() as bar:
        task = bar.add_task("users", total=None)

        def step(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            report = evaluation.run(conn, split_at=parse_as_of(split_at), split_fraction=split_fraction, ns=sizes,
                                    max_users=max_users, progress=step)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    paths = evaluation.save(report, out)
    console.print(evaluation.table(report))
    for note in report.get("notes", []):
        console.print(f"[yellow]note: {escape(note)}[/yellow]")
    console.print(f"saved {paths['json']}, {paths['md']} and {paths['png']}")


@bench_app.command("candidates")
def bench_candidates(
    items: Annotated[int, typer.Option(help="catalog size to generate")] = 100_000,
    n: Annotated[int, typer.Option(help="union size")] = 500,
    requests: Annotated[int, typer.Option(help="timed requests per measurement")] = 200,
    reuse: Annotated[bool, typer.Option(help="reuse an existing benchmark catalog of that size")] = True,
    stored: Annotated[bool, typer.Option("--neighbours/--no-neighbours",
                                         help="build the stored embedding neighbours first (as a deployment "
                                              "keeps them; 1 ms per item at 100k items, 2.5 at 1M)")] = True,
) -> None:
    """Latency of each source and of the union beside a bare HNSW top-100 probe (prints numbers)."""
    import engine.bench.candidates as bench
    from engine.config import get_settings

    for line in bench.run(get_settings(), items=items, n=n, requests=requests, reuse=reuse, stored_neighbors=stored):
        console.print(line)
