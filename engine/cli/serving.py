"""CLI commands for serving: recommend (one user or a file of users), models compile, bench serve, demo."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from engine.cli.app import AsOf, app, bench_app, console, fail, models_app, parse_as_of
from engine.cli.core import db_connection, progress_bar
from engine.config import get_settings
from engine.db import DatabaseError
from engine.errors import PgrecError


def _read_users(path: Path) -> list[str]:
    """One user id per line (blank lines and lines starting with # are skipped); a JSONL line may be
    {"user_id": ...}."""
    if not path.is_file():
        raise fail(f"{path}: no such file")
    users: list[str] = []
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is not part of the first id
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = len((data[:exc.start].decode("utf-8") + "x").splitlines())  # lines as the loop below counts them
        raise fail(f"{path}:{line_no}: not UTF-8 (byte {data[exc.start]:#04x})") from None
    # every id is checked here, before the first batch is served and logged
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                value = json.loads(line)["user_id"]
            except (ValueError, KeyError, TypeError):
                raise fail(f"{path}:{n}: a JSON line needs a \"user_id\" field") from None
            # ids are strings (integers are read as their decimal text, as the imports do)
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise fail(f"{path}:{n}: user_id must be a string or an integer, got {json.dumps(value)}")
            line = str(value)
            if not line.strip():
                raise fail(f"{path}:{n}: user_id is empty")
        if len(line) > 256:
            raise fail(f"{path}:{n}: user id longer than 256 characters")
        if "\x00" in line:
            raise fail(f"{path}:{n}: user id contains a NUL character")
        users.append(line)
    if not users:
        raise fail(f"{path}: no user ids")
    unique = list(dict.fromkeys(users))  # one list per user, in the file's order
    if len(unique) < len(users):
        console.print(f"{path}: {len(users) - len(unique)} repeated user ids served once")
    return unique


def _item_json(it: Any) -> dict[str, Any]:
    return {"item_id": it.item_id, "score": it.score, "position": it.position, "reasons": it.reasons}


@app.command("recommend")
def recommend_cmd(
    user: Annotated[str | None, typer.Argument(help="user id (an unknown id is a cold user)")] = None,
    k: Annotated[int, typer.Option("--k", help="list length")] = 10,
    surface: Annotated[str, typer.Option("--surface")] = "default",
    as_of: AsOf = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    users_file: Annotated[Path | None, typer.Option("--users-file", help="one user id per line")] = None,
    output: Annotated[Path | None, typer.Option("--output", help="with --users-file: write JSONL here")] = None,
    via: Annotated[str, typer.Option("--via", help="python (LightGBM in process) or sql (pgrec.recommend)")] = "python",
    log: Annotated[bool | None, typer.Option(
        "--log/--no-log", help="record the lists as impressions (default: yes, but not for a replay at --as-of)")] = None,
    include_seen: Annotated[bool, typer.Option(
        "--include-seen", help="with --users-file: keep items the user already had events with (left out by "
                               "default, whatever the surface's policies)")] = False,
) -> None:
    """Recommendations for USER, or for every user of --users-file into --output (JSONL, one line per user)."""
    from engine.pipeline import Recommender

    if (user is None) == (users_file is None):
        raise fail("give either a USER or --users-file FILE")
    if users_file is not None and output is None:
        raise fail("--users-file needs --output FILE (JSONL)")
    if users_file is None and output is not None:
        raise fail("--output goes with --users-file (for one USER, --json prints the list)")
    if via not in ("python", "sql"):
        raise fail("--via must be python or sql")
    when = parse_as_of(as_of)
    if log is None:  # a list replayed at a past time was never shown: it must not count in the online report
        log = when is None
    if users_file is not None and output is not None and output.is_dir():
        raise fail(f"--output {output}: is a directory")
    if via == "sql":
        if user is None:
            raise fail("--via sql serves one USER (the batch mode uses the Python path)")
        _recommend_sql(user, k, surface, when, log, as_json)
        return
    wanted = _read_users(users_file) if users_file is not None else []
    # a batch is offline work: no per-statement limit meant for live requests
    update: dict[str, Any] = {"pool_min_size": 1, "pool_max_size": 2}
    if users_file is not None:
        update["statement_timeout_ms"] = 0
    settings = get_settings().model_copy(update=update)
    try:
        rec = Recommender(settings)
    except DatabaseError as exc:
        raise fail(str(exc)) from None
    try:
        if users_file is not None:
            assert output is not None
            _recommend_file(rec, wanted, output, k, surface, when, log, exclude_seen=not include_seen)
            return
        assert user is not None
        r = rec.recommend(user, k=k, surface=surface, as_of=when, log=log)
    except PgrecError as exc:
        raise fail(str(exc)) from None
    finally:
        rec.close()
    if as_json:
        print(json.dumps({"request_id": str(r.request_id) if r.request_id else None, "user_id": r.user_id,
                          "surface": r.surface, "model_version": r.model_version,
                          "items": [_item_json(i) for i in r.items], "dropped": r.dropped,
                          "skipped": r.skipped, "timings_ms": r.timings_ms}, default=str))
        return
    t = Table(title=f"{r.user_id} on {r.surface}: model {r.model_version or 'none (fallback score)'}, "
                    f"request {r.request_id}")
    for col in ("#", "item", "score", "reasons"):
        t.add_column(col, justify="right" if col in ("#", "score") else "left")
    for it in r.items:
        t.add_row(str(it.position), it.item_id, f"{it.score:.4f}", json.dumps(it.reasons, default=str)[:100])
    console.print(t)
    for label, why in r.skipped.items():
        console.print(f"[yellow]policy {escape(str(label))} did not run: {escape(str(why))}[/yellow]")
    console.print("timings ms: " + ", ".join(f"{k_} {v:.1f}" for k_, v in r.timings_ms.items()))


def _recommend_sql(user: str, k: int, surface: str, as_of: datetime | None, log: bool, as_json: bool) -> None:
    from engine.sql import query

    with db_connection() as conn:
        rows = conn.execute(query("serving.recommend_sql"), {
            "user_id": user, "k": k, "surface": surface, "context": "{}", "as_of": as_of, "model_version": None,
            "policy_set": None, "variant": None, "log": log}).fetchall()
    if as_json:
        print(json.dumps({"request_id": str(rows[0][0]) if rows and rows[0][0] else None, "user_id": user,
                          "items": [{"item_id": r[2], "score": r[3], "position": r[1], "reasons": r[4]}
                                    for r in rows]}, default=str))
        return
    t = Table(title=f"{user} on {surface} (pgrec.recommend), request {rows[0][0] if rows else None}")
    for col in ("#", "item", "score", "reasons"):
        t.add_column(col, justify="right" if col in ("#", "score") else "left")
    for r in rows:
        t.add_row(str(r[1]), r[2], f"{r[3]:.4f}", json.dumps(r[4], default=str)[:100])
    console.print(t)


def _recommend_file(rec: Any, users: list[str], output: Path, k: int, surface: str, as_of: datetime | None,
                    log: bool, *, exclude_seen: bool) -> None:
    from engine.pipeline import BATCH

    tmp = output.with_suffix(output.suffix + ".part")
    try:  # the file is opened before any list is served (and logged): an unwritable --output fails first
        output.parent.mkdir(parents=True, exist_ok=True)
        fh = tmp.open("w")
    except OSError as exc:
        raise fail(f"--output {output}: {exc.strerror or exc}") from None
    try:
        with fh, progress_bar() as bar:
            task = bar.add_task("recommend", total=len(users))
            for start in range(0, len(users), BATCH):
                chunk = users[start:start + BATCH]
                for r in rec.recommend_many(chunk, k=k, surface=surface, as_of=as_of, log=log,
                                            exclude_seen=exclude_seen):
                    fh.write(json.dumps({"user_id": r.user_id,
                                         "request_id": str(r.request_id) if r.request_id else None,
                                         "items": [_item_json(i) for i in r.items]}, default=str) + "\n")
                bar.advance(task, len(chunk))
        tmp.replace(output)  # all or nothing: a failed run leaves no half-written file behind
    except OSError as exc:
        raise fail(f"--output {output}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    console.print(f"{len(users)} users -> {output}")


@models_app.command("compile")
def models_compile(version: Annotated[int, typer.Argument(help="model version (pgrec.models)")]) -> None:
    """Compile a ranker model to SQL (pgrec.ranker_score_v<version>) for pgrec.recommend."""
    from engine.ranking.compile import install_compiled_model

    with db_connection() as conn:
        try:
            c = install_compiled_model(conn, version)
        except PgrecError as exc:
            raise fail(str(exc)) from None
    console.print(f"model {version}: {c.num_trees} trees, {len(c.features)} features -> pgrec.{c.function_name}"
                  f" ({len(c.sql):,} characters of SQL)")


@bench_app.command("serve")
def bench_serve(
    items: Annotated[int, typer.Option(help="generated items")] = 100_000,
    users: Annotated[int, typer.Option(help="generated users")] = 20_000,
    events: Annotated[int, typer.Option(help="generated events")] = 2_000_000,
    requests: Annotated[int, typer.Option(help="timed requests per path")] = 300,
    k: Annotated[int, typer.Option("--k")] = 10,
    reuse: Annotated[bool, typer.Option("--reuse/--fresh", help="reuse data of the same size if present")] = True,
    write: Annotated[Path | None, typer.Option("--write", help="update this benchmarks file (section Serving)")] = None,
    stored: Annotated[bool, typer.Option("--neighbours/--no-neighbours",
                                         help="build the stored embedding neighbours first (as a deployment "
                                              "keeps them; 1 ms per item at 100k items, 2.5 at 1M)")] = True,
) -> None:
    """p50/p95/p99 of the Python path and of the SQL-only path, per stage, beside a bare HNSW top-100 probe."""
    from engine.bench.serve import BenchConfig, run

    cfg = BenchConfig(items=items, users=users, events=events, requests=requests, k=k, reuse=reuse,
                      stored_neighbors=stored)
    try:
        for line in run(get_settings(), cfg, write=write, say=console.print):
            console.print(line)
    except (DatabaseError, PgrecError) as exc:
        raise fail(str(exc)) from None


@app.command("demo")
def demo_cmd(
    movielens: Annotated[Path | None, typer.Option("--movielens", help="a MovieLens folder instead of synthetic data")]
    = None,
    users: Annotated[int, typer.Option(help="synthetic users")] = 1_000,
    items: Annotated[int, typer.Option(help="synthetic items")] = 500,
    events: Annotated[int, typer.Option(help="synthetic events")] = 30_000,
    eval_users: Annotated[int, typer.Option(help="test users evaluated (a seeded sample)")] = 100,
    out_dir: Annotated[Path, typer.Option("--out", help="where the HTML reports go")] = Path("out/demo"),
    database: Annotated[str, typer.Option("--database", help="database name on the embedded server")] = "pgrec_demo",
) -> None:
    """The whole thing on a fresh machine: data, training, evaluation against baselines, recommendations."""
    from engine.demo import DemoConfig, run

    command = "pgrec demo" + (f" --movielens {movielens}" if movielens else f" --users {users} --items {items} "
                                                                          f"--events {events}")
    cfg = DemoConfig(movielens=movielens, users=users, items=items, events=events, out_dir=out_dir, database=database,
                     command=command, eval_users=eval_users)
    try:
        run(get_settings(), cfg, console)
    except (DatabaseError, PgrecError, FileNotFoundError) as exc:
        raise fail(str(exc)) from None


@bench_app.command("ab")
def bench_ab(
    a: Annotated[str, typer.Argument(help="database A on the server (e.g. the new schema)")],
    b: Annotated[str, typer.Argument(help="database B (e.g. a copy at the old schema)")],
    calls: Annotated[str, typer.Option(help="comma-separated: candidates, features, recommend")] =
        "candidates,features,recommend",
    users: Annotated[int, typer.Option(help="users with events, chosen at random")] = 200,
    n: Annotated[int, typer.Option("--n", help="candidates per call")] = 200,
) -> None:
    """Server CPU per call of request-path functions, A and B called alternately for the same users."""
    from engine.bench.ab import run

    try:
        for line in run(get_settings(), a, b, calls=[c.strip() for c in calls.split(",") if c.strip()],
                        users=users, n=n):
            console.print(line)
    except (DatabaseError, PgrecError, ValueError) as exc:
        raise fail(str(exc)) from None
