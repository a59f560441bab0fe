"""CLI commands for the ranker: ``pgrec train ranker|all``, ``pgrec models ...``, ``pgrec eval``, ``pgrec explain``."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.cli.app import app, bench_app, console, eval_app, fail, models_app, train_app
from engine.cli.core import db_connection
from engine.errors import InvalidRequest, NotFound
from engine.ingest import FieldError, parse_time


def _time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, name, required=True)
    except (FieldError, ValueError) as exc:
        raise fail(str(exc)) from None


@contextmanager
def _stages() -> Iterator[Any]:
    """A progress bar per stage, fed by ``progress(stage, done, total)`` callbacks."""
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console)
    tasks: dict[str, TaskID] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar:
        yield progress


def _ranker_config(horizon_days: float | None, cutoff_count: int, n: int | None, max_users: int, rounds: int, seed: int,
                   source: str, window_share: float = 0.025, valid_windows: int = 3) -> Any:
    from engine.ranking.train import RankerConfig

    if source not in ("replay", "impressions"):
        raise fail(f"--from must be 'replay' or 'impressions', got {source!r}")
    checks = {"--horizon-days": (horizon_days is None or horizon_days > 0, "must be > 0"),
              "--cutoff-count": (cutoff_count >= 1, "must be >= 1"),
              "--window-share": (0 < window_share * (cutoff_count + 1) < 1,
                                 f"must be > 0 and below 1 / (--cutoff-count + 1) = {1 / (cutoff_count + 1):.4g}"),
              "--n": (n is None or n >= 1, "must be >= 1"), "--max-users": (max_users >= 1, "must be >= 1"),
              "--rounds": (rounds >= 1, "must be >= 1"), "--valid-windows": (valid_windows >= 1, "must be >= 1")}
    for name, (ok, rule) in checks.items():
        if not ok:
            raise fail(f"{name} {rule}")
    return RankerConfig(horizon_days=horizon_days, window_share=window_share, cutoffs=cutoff_count, n_candidates=n,
                        max_users_per_cutoff=max_users, num_boost_round=rounds, seed=seed, source=source,
                        valid_windows=valid_windows)


HorizonDays = Annotated[float | None, typer.Option(
    "--horizon-days", help="label window after each cutoff in days (default: windows of --window-share events)")]
WindowShare = Annotated[float, typer.Option("--window-share", help="share of the events in each label window")]
CutoffCount = Annotated[int, typer.Option("--cutoff-count", help="cutoffs (plus one); the last --valid-windows "
                                                            "of them validate")]
ValidWindows = Annotated[int, typer.Option("--valid-windows", help="latest label windows that choose the number of "
                                                               "rounds (early stopping); then every window trains")]
N = Annotated[int, typer.Option("--n", help="candidates per user")]
TrainN = Annotated[int | None, typer.Option("--n", help="candidates per user (default: the serving count, config "
                                                       "serving_candidates, so the model learns from the lists it ranks)")]
MaxUsers = Annotated[int, typer.Option("--max-users", help="users sampled per cutoff")]
Rounds = Annotated[int, typer.Option("--rounds", help="boosting rounds at most (early stopping)")]
Seed = Annotated[int, typer.Option("--seed")]


def _print_trained(version: int, trained: Any, activated: bool) -> None:
    m = trained.metrics
    valid = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("valid_") and isinstance(v, float))
    console.print(f"ranker v{version}{' active' if activated else ''}: {m['train_groups']} training groups "
                  f"({m['train_rows']:,} rows), {m['valid_groups']} validation groups; best iteration "
                  f"{m['best_iteration']}"
                  f"{'' if m.get('refit_rounds') in (None, m['best_iteration']) else ', refit ' + str(m['refit_rounds'])}"
                  f"{'; ' + valid if valid else ''}; {m['seconds']:.1f}s")
    if "train_logged_groups" in m:
        console.print(f"served lists: {m['train_logged_groups'] + m['valid_logged_groups']} of "
                      f"{m['train_groups'] + m['valid_groups']} groups with the feature rows they were ranked with "
                      "(the others recomputed from the event log)")
    top = list(trained.importance.items())[:8]
    console.print("top features (gain share): " + ", ".join(f"{k} {v:.2f}" for k, v in top))


@train_app.command("ranker")
def train_ranker_cmd(
    cutoffs: Annotated[str | None, typer.Option("--cutoffs", help="comma-separated ISO times; the last validates")] = None,
    source: Annotated[str, typer.Option("--from", help="replay (the event log) or impressions")] = "replay",
    until: Annotated[str | None, typer.Option("--until", help="no label from events at or after this time")] = None,
    since: Annotated[str | None, typer.Option("--since", help="impressions: served from this time")] = None,
    attribution_hours: Annotated[float | None, typer.Option(
        "--attribution-hours", help="impressions: an event without a request id counts for a list shown this many "
                                    "hours before it (default: config report_attribution_hours, as the online "
                                    "report)")] = None,
    recompute_features: Annotated[bool, typer.Option(
        "--recompute-features", help="impressions: recompute every list's features from the event log instead of "
                                     "reading the rows it was ranked with (stored when it was served)")] = False,
    horizon_days: HorizonDays = None,
    window_share: WindowShare = 0.025,
    cutoff_count: CutoffCount = 19,
    valid_windows: ValidWindows = 3,
    n: TrainN = None,
    max_users: MaxUsers = 2000,
    rounds: Rounds = 400,
    seed: Seed = 42,
    no_activate: Annotated[bool, typer.Option("--no-activate", help="store without activating")] = False,
) -> None:
    """Train the LightGBM lambdarank ranker and store it in the registry (active unless --no-activate)."""
    from engine.ranking.train import train_ranker

    config = _ranker_config(horizon_days, cutoff_count, n, max_users, rounds, seed, source, window_share,
                            valid_windows)
    if attribution_hours is not None:
        if source != "impressions":
            raise fail("--attribution-hours is for --from impressions (replay labels come from label windows)")
        if not 0 <= attribution_hours <= 87600:  # 0: only events citing the list count (as in the config)
            raise fail("--attribution-hours must be between 0 and 87600 (ten years)")
        config = replace(config, attribution_hours=attribution_hours)
    if recompute_features:
        if source != "impressions":
            raise fail("--recompute-features is for --from impressions (replay always computes features)")
        config = replace(config, recompute_features=True)
    cuts = None
    if cutoffs:
        cuts = [t for t in (_time(c.strip(), "--cutoffs") for c in cutoffs.split(",") if c.strip()) if t]
        if len(cuts) < 2:
            raise fail("--cutoffs needs at least two times: the last window validates (it chooses the number "
                       "of rounds), the earlier ones train")
    with db_connection() as conn:
        try:
            with _stages() as progress:
                trained = train_ranker(conn, config, until=_time(until, "--until"), cutoffs=cuts,
                                       since=_time(since, "--since"), progress=progress)
            version = trained.save(conn, activate=not no_activate)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    _print_trained(version, trained, not no_activate)


@train_app.command("ease")
def train_ease_cmd(
    as_of: Annotated[str | None, typer.Option("--as-of", help="fit on the events before this time (default now)")] = None,
    lam: Annotated[float, typer.Option("--lambda", help="L2 weight")] = 200.0,
    max_items: Annotated[int, typer.Option("--max-items", help="fit over this many items with the most users "
                                                               "(EASE inverts an items x items matrix)")] = 5000,
    top_n: Annotated[int, typer.Option("--top-n", help="neighbours stored per item")] = 50,
) -> None:
    """EASE item-item weights -> top-N neighbours per item in pgrec.model_neighbors (model 'ease'), the ranker's
    f_ease_* features. Only the --max-items items with the most users are fitted (memory ~ items^2)."""
    from engine import itemsim

    with db_connection() as conn:
        try:
            with _stages() as progress:
                b = itemsim.build_ease(conn, as_of=_time(as_of, "--as-of"),
                                       config=itemsim.EaseConfig(lam=lam, max_items=max_items, top_n=top_n),
                                       progress=progress)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    console.print(f"ease: {b.items:,} items x {b.users:,} users before {b.as_of.isoformat()}, "
                  f"{b.rows:,} neighbours stored in {b.seconds:.1f}s")


@train_app.command("all")
def train_all_cmd(
    horizon_days: HorizonDays = None,
    window_share: WindowShare = 0.025,
    cutoff_count: CutoffCount = 19,
    valid_windows: ValidWindows = 3,
    n: TrainN = None,
    max_users: MaxUsers = 2000,
    rounds: Rounds = 400,
    seed: Seed = 42,
    epochs: Annotated[int, typer.Option("--epochs", help="retrieval: at most this many epochs")] = 30,
) -> None:
    """Co-occurrence, EASE neighbours, then the retrieval model, then the ranker (each becomes active).

    The ranker's training replay sees co-occurrence and EASE rebuilt as of each of its cutoffs and the retrieval
    model trained as of the first one (no label window leaks into its features); all are then rebuilt from every
    event for serving."""
    from engine.ranking.train import train_all

    config = _ranker_config(horizon_days, cutoff_count, n, max_users, rounds, seed, "replay", window_share,
                            valid_windows)
    with db_connection() as conn:
        try:
            with _stages() as progress:
                result = train_all(conn, config, retrieval_epochs=epochs, progress=progress)
            trained = result.ranker
            version = trained.save(conn, activate=True)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    console.print(f"co-occurrence build #{result.cooccurrence_build}, retrieval model v{result.retrieval_version}")
    _print_trained(version, trained, True)


# ---------------------------------------------------------------- models


@models_app.command("list")
def models_list(
    kind: Annotated[str | None, typer.Option("--kind", help="ranker, retrieval, ... (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Every stored model, newest first."""
    from engine.ranking import registry

    with db_connection() as conn:
        models = registry.list_models(conn, kind)
    if as_json:
        print(json.dumps([{**m.__dict__, "created_at": m.created_at.isoformat(),
                           "activated_at": m.activated_at.isoformat() if m.activated_at else None}
                          for m in models], default=str))
        return
    t = Table(title="models")
    for col in ("version", "kind", "active", "created", "features", "metrics", "data window"):
        t.add_column(col)
    for m in models:
        metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in m.metrics.items() if not isinstance(v, dict | list))[:80]
        window = ", ".join(f"{k} {v}" for k, v in m.data_window.items() if not isinstance(v, list))[:80]
        t.add_row(str(m.version), m.kind, "yes" if m.active else "", f"{m.created_at:%Y-%m-%d %H:%M}",
                  str(len(m.features)), metrics, window)
    console.print(t)


@models_app.command("activate")
def models_activate(version: Annotated[int, typer.Argument(help="the model version")]) -> None:
    """Make VERSION the active model of its kind (serving processes switch within seconds)."""
    from engine.ranking import registry

    with db_connection() as conn:
        try:
            info = registry.activate(conn, version)
        except (NotFound, InvalidRequest) as exc:
            raise fail(str(exc)) from None
    console.print(f"{info.kind} v{info.version} is active")


@models_app.command("rollback")
def models_rollback(kind: Annotated[str, typer.Option("--kind")] = "ranker") -> None:
    """Re-activate the model that was active before the current one."""
    from engine.ranking import registry

    with db_connection() as conn:
        try:
            info = registry.rollback(conn, kind)
        except (NotFound, InvalidRequest) as exc:
            raise fail(str(exc)) from None
    console.print(f"rolled back: {info.kind} v{info.version} is active")


# ---------------------------------------------------------------- eval, explain


@eval_app.callback(invoke_without_command=True)
def eval_cmd(
    ctx: typer.Context,
    split_at: Annotated[str | None, typer.Option("--split-at", help="split time (ISO 8601)")] = None,
    split_fraction: Annotated[float | None, typer.Option("--split-fraction", help="share of events before the split")] = None,
    horizon_days: Annotated[float | None, typer.Option("--test-days", help="test window after the split (default: all)")] = None,
    n: N = 300,
    max_users: Annotated[int | None, typer.Option("--max-users", help="evaluate a sample of the test users")] = None,
    ranker_horizon: Annotated[float | None, typer.Option("--ranker-horizon-days",
                                                         help="ranker label window (default: by event share)")] = None,
    window_share: WindowShare = 0.025,
    cutoff_count: CutoffCount = 19,
    valid_windows: ValidWindows = 3,
    no_retrieval: Annotated[bool, typer.Option("--no-retrieval", help="keep the stored item vectors")] = False,
    output: Annotated[Path, typer.Option("--output", help="folder for report.html/json and the PNGs")] = Path("out/eval"),
    seed: Seed = 42,
) -> None:
    """The full funnel beside popularity, EASE and each candidate source, on a temporal split.

    It trains co-occurrence, EASE and retrieval as of each cutoff and the split, in one transaction that is
    rolled back at the end: the served models stay as they were. Until it ends, serving waits on the
    co-occurrence lists it rebuilds: evaluate a copy of a busy database."""
    if ctx.invoked_subcommand is not None:
        # `pgrec eval --split-fraction 0.5 candidates` would evaluate candidates at the subcommand's default split
        # (by name: typer carries its own copy of click, whose ParameterSource is not click's)
        given = [p.opts[0] for p in ctx.command.params
                 if p.name and getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"]
        if given:
            raise fail(f"{', '.join(given)} belong to `pgrec eval` itself; give the options of "
                       f"`pgrec eval {ctx.invoked_subcommand}` after it (see `pgrec eval {ctx.invoked_subcommand} --help`)")
        return
    from engine.evaluation import funnel, report
    from engine.ranking.train import RankerConfig

    if split_at is not None and split_fraction is not None:
        raise fail("give --split-at or --split-fraction, not both")
    if valid_windows < 1:
        raise fail("--valid-windows: out of range")
    if max_users is not None and max_users < 1:
        raise fail("--max-users must be >= 1")
    if horizon_days is not None and horizon_days <= 0:
        raise fail("--test-days must be > 0")
    if cutoff_count < 1:
        raise fail("--cutoff-count must be >= 1 (the last --valid-windows label windows choose the rounds)")
    rc = replace(RankerConfig(), horizon_days=ranker_horizon, window_share=window_share, cutoffs=cutoff_count,
                 n_candidates=n, seed=seed, valid_windows=valid_windows)
    config = funnel.EvalConfig(split_at=_time(split_at, "--split-at"), split_fraction=split_fraction,
                               horizon_days=horizon_days, n_candidates=n, max_users=max_users,
                               retrieval=not no_retrieval, ranker=rc, seed=seed)
    with db_connection() as conn:
        try:
            # rolled back: the stage-1 models trained as of the split must not replace the served ones
            with _stages() as progress, conn.transaction(force_rollback=True):
                result, _ = funnel.run(conn, config, progress=progress)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    paths = report.write(result, output, command="pgrec " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    t = Table(title=f"split at {result.split['cutoff']}: {result.split['users']} users "
                    f"({result.split['users_with_history']} with history), n={n}")
    t.add_column("method")
    for metric in report.METRICS:
        t.add_column(metric, justify="right")
    for name, vals in result.methods.items():
        style = "bold red" if name == "funnel" else None
        t.add_row(name, *(f"{vals.get(mt, 0.0):.4f}" for mt in report.METRICS), style=style)
    console.print(t)
    s = result.as_dict()["summary"]
    ratio = f"{s['ratio']:.3f}" if s["ratio"] is not None else "n/a"
    console.print(f"funnel NDCG@10 {s['funnel_ndcg@10']:.4f} / best baseline ({s['best_baseline']}) "
                  f"{s['best_baseline_ndcg@10']:.4f} = {ratio}")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"report: {paths['html']} (and {paths['json'].name}, PNGs)")


@app.command("explain")
def explain_cmd(
    user: Annotated[str, typer.Argument(help="user id")],
    item: Annotated[str, typer.Argument(help="item id")],
    as_of: Annotated[str | None, typer.Option("--as-of", help="features as of this time (ISO 8601)")] = None,
    version: Annotated[int | None, typer.Option("--version", help="model version (default: the active ranker)")] = None,
    n: Annotated[int | None, typer.Option("--n", help="candidates per user (default: the serving count, config "
                                                      "serving_candidates), as the served lists were ranked")] = None,
    request: Annotated[str | None, typer.Option(
        "--request", help="a served list's request id: ITEM as USER was shown it there, by the ranker version that "
                          "served it, with the feature row it was ranked with")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The ranker's features for USER and ITEM and each one's contribution to the score (pred_contrib)."""
    from engine.ranking import explain, registry

    rid = None
    if request is not None:
        if as_of is not None or version is not None or n is not None:
            raise fail("--request explains the list as it was served: --as-of, --version and --n do not apply")
        try:
            rid = UUID(request)
        except ValueError:
            raise fail(f"--request must be a request id (a UUID), got {request!r}") from None
    with db_connection() as conn:
        try:
            if rid is not None:
                ex = explain.explain_served(conn, rid, item)
                if ex.user_id != user:
                    raise fail(f"request {rid} was served to user {ex.user_id!r}, not {user!r}")
            else:
                v = version if version is not None else registry.active_version(conn)
                if v is None:
                    raise fail("no ranker is active: run `pgrec train ranker` or give --version")
                model = registry.load(conn, v)
                ex = explain.explain(conn, model, user, item, as_of=_time(as_of, "--as-of"), n=n)
        except (NotFound, InvalidRequest) as exc:
            raise fail(str(exc)) from None
    if as_json:
        print(json.dumps({**ex.__dict__, "as_of": ex.as_of.isoformat() if ex.as_of else None,
                          "request_id": str(ex.request_id) if ex.request_id else None,
                          "contributions": [c.__dict__ for c in ex.contributions]}))
        return
    served = ""
    if ex.request_id is not None:
        served = (f"; shown at position {ex.position} of request {ex.request_id} (served score "
                  f"{ex.served_score:.4f}, after policies), features "
                  f"{'as stored when served' if ex.stored_features else 'recomputed as of ' + str(ex.as_of)}")
    t = Table(title=f"{user} x {item}: score {ex.score:.4f} (base {ex.base:.4f}), ranker v{ex.model_version}, "
                    f"sources {','.join(ex.sources) or '-'}{served}")
    t.add_column("feature")
    t.add_column("value", justify="right")
    t.add_column("contribution", justify="right")
    for c in ex.contributions:
        t.add_row(c.name, "NaN" if c.value is None else f"{c.value:.4g}", f"{c.contribution:+.4f}")
    console.print(t)


@bench_app.command("ranker")
def bench_ranker(
    users: Annotated[int, typer.Option("--users", help="sampled users")] = 50,
    n: Annotated[int, typer.Option("--n", help="candidates per user")] = 500,
    as_of: Annotated[str | None, typer.Option("--as-of", help="features as of this time (ISO 8601)")] = None,
) -> None:
    """Request-path cost of stage 2 on the loaded data: candidates, candidates + features, predict, and the
    active model compiled to SQL."""
    from engine.bench.ranking import run

    if users < 1 or n < 1:
        raise fail("--users and --n must be positive")
    with db_connection() as conn:
        for line in run(conn, users=users, n=n, as_of=_time(as_of, "--as-of")):
            console.print(line)
