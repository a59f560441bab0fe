"""CLI commands for retrieval (registered on the groups of engine.cli.app):
``pgrec train retrieval``, ``pgrec eval retrieval``, ``pgrec bench retrieval``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.cli.app import bench_app, console, eval_app, fail, train_app
from engine.cli.core import db_connection
from engine.errors import InvalidRequest
from engine.ingest import FieldError, parse_time

Dim = Annotated[int | None, typer.Option("--dim", help="vector dimension (default: the schema's embedding_dim)")]
Epochs = Annotated[int, typer.Option("--epochs", help="at most this many epochs (early stopping)")]
Seed = Annotated[int, typer.Option("--seed")]
Lr = Annotated[float, typer.Option("--lr", help="Adam step size")]
Temperature = Annotated[float, typer.Option("--temperature", help="softmax temperature on cosines")]
BatchSize = Annotated[int, typer.Option("--batch-size")]
UserFeatures = Annotated[bool, typer.Option("--user-features/--no-user-features",
                                            help="users' property tokens in the user tower")]


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, name, required=True)
    except FieldError as exc:
        raise fail(str(exc)) from None


def _config(conn: Any, dim: int | None, epochs: int, seed: int, lr: float, temperature: float,
            batch_size: int, user_features: bool = True) -> Any:
    from engine.retrieval.store import schema_dim
    from engine.retrieval.train import RetrievalConfig

    cfg = RetrievalConfig(dim=dim if dim is not None else schema_dim(conn), epochs=epochs, seed=seed, lr=lr,
                          temperature=temperature, batch_size=batch_size, user_features=user_features)
    try:
        cfg.validate()
    except InvalidRequest as exc:
        raise fail(str(exc)) from None
    return cfg


@contextmanager
def _training_bar() -> Iterator[tuple[Any, Any]]:
    """A progress bar per epoch showing the loss and the validation recall."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"), console=console)
    state: dict[str, Any] = {"task": None}

    def on_batch(n: int) -> None:
        if state["task"] is None:
            state["task"] = bar.add_task("epoch 1", total=None, info="")
        bar.advance(state["task"], n)

    def on_epoch(stats: Any, batches: int) -> None:
        val = f"val recall@100 {stats.val_recall:.4f}" if stats.val_recall is not None else ""
        bar.update(state["task"], total=batches, completed=batches,
                   description=f"{stats.phase} epoch {stats.epoch}", info=f"loss {stats.loss:.4f} {val}")
        state["task"] = bar.add_task(f"{stats.phase} epoch {stats.epoch + 1}", total=batches, info="")

    with bar:
        yield on_batch, on_epoch
        if state["task"] is not None:
            bar.remove_task(state["task"])


@train_app.command("retrieval")
def train_retrieval(
    dim: Dim = None,
    epochs: Epochs = 30,
    as_of: Annotated[str | None, typer.Option("--as-of", help="train on events before this time (ISO 8601)")] = None,
    seed: Seed = 0,
    lr: Lr = 0.005,
    temperature: Temperature = 0.07,
    batch_size: BatchSize = 512,
    user_features: UserFeatures = True,
) -> None:
    """Train the two-tower model on the events, store item/context/user vectors and activate the model.

    The vectors are upserted and the model activated in one transaction (readers switch at the commit).
    """
    from engine.retrieval.store import train_and_store

    t = _time(as_of, "--as-of")
    with db_connection() as conn:
        cfg = _config(conn, dim, epochs, seed, lr, temperature, batch_size, user_features)
        try:
            with _training_bar() as (on_batch, on_epoch):
                stored = train_and_store(conn, cfg, as_of=t, on_batch=on_batch, on_epoch=on_epoch)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    r = stored.result
    console.print(
        f"retrieval model v{stored.version} active: {stored.items:,} item vectors, {stored.users:,} user vectors "
        f"(based on events before {stored.based_on.isoformat()}); best epoch {r.best_epoch}, "
        f"val recall@100 {r.best_val_recall if r.best_val_recall is not None else 'n/a'}, "
        f"{r.pairs:,} pairs, {r.seconds_total:.1f}s"
    )


@eval_app.command("retrieval")
def eval_retrieval(
    split_at: Annotated[str | None, typer.Option("--split-at", help="the split time (ISO 8601)")] = None,
    split_fraction: Annotated[float | None, typer.Option("--split-fraction",
                                                         help="split where this share of events lies before")] = None,
    dim: Dim = None,
    epochs: Epochs = 30,
    seed: Seed = 0,
    lr: Lr = 0.005,
    temperature: Temperature = 0.07,
    batch_size: BatchSize = 512,
    no_ann: Annotated[bool, typer.Option("--no-ann", help="exact numpy top k only (no HNSW index)")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    user_features: UserFeatures = True,
) -> None:
    """Recall@50/100/200 of the two-tower ann source on a temporal split, beside popularity and EASE."""
    from engine.evaluation.retrieval import evaluate_retrieval
    from engine.evaluation.split import resolve_cutoff

    if split_at is not None and split_fraction is not None:
        raise fail("give --split-at or --split-fraction, not both")
    with db_connection() as conn:
        cfg = _config(conn, dim, epochs, seed, lr, temperature, batch_size, user_features)
        try:
            cutoff = resolve_cutoff(conn, _time(split_at, "--split-at"), split_fraction)
            with _training_bar() as (on_batch, on_epoch):
                report = evaluate_retrieval(conn, cutoff, cfg, use_ann=not no_ann, on_batch=on_batch,
                                            on_epoch=on_epoch)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    if as_json:
        out = asdict(report)
        out["cutoff"] = report.cutoff.isoformat()
        print(json.dumps(out, default=str))
        return
    t = Table(title=f"retrieval on the split at {cutoff.isoformat()} ({report.users} test users)")
    t.add_column("method")
    for k in report.ks:
        t.add_column(f"recall@{k}", justify="right")
    for name, row in report.rows.items():
        t.add_row(name, *(f"{row[f'recall@{k}']:.4f}" for k in report.ks))
    console.print(t)
    for key, value in report.cold.items():
        console.print(f"cold start: {key}: {value:.4f}" if isinstance(value, float) else f"cold start: {key}: {value}")
    console.print(f"training: best epoch {report.train['best_epoch']}, val recall@100 "
                  f"{report.train['val_recall@100']}, {report.train['seconds_total']}s; "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()))


@bench_app.command("retrieval")
def bench_retrieval(
    events: Annotated[int, typer.Option("--events")] = 1_000_000,
    users: Annotated[int, typer.Option("--users")] = 6_000,
    items: Annotated[int, typer.Option("--items")] = 4_000,
    dim: Annotated[int, typer.Option("--dim")] = 64,
    epochs: Epochs = 30,
    threads: Annotated[int, typer.Option("--threads", help="BLAS threads (set before numpy loads)")] = 2,
) -> None:
    """Training time of the two-tower model on ML-1M-sized synthetic data (no database involved)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from engine.bench.retrieval import run

    for line in run(events=events, users=users, items=items, dim=dim, epochs=epochs):
        console.print(line)
