"""CLI commands for the HTTP service: serve, keys, experiments, report online, bench http."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from engine import experiments
from engine.cli.app import app, bench_app, console, experiments_app, fail, keys_app, report_app
from engine.cli.core import db_connection
from engine.config import get_settings
from engine.errors import InvalidRequest


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes (stateless copies)")] = 1,
    metrics_dir: Annotated[Path | None, typer.Option(
        help="where workers share Prometheus samples (multiprocess mode; default: a fresh temp dir)")] = None,
) -> None:
    """Run the HTTP service (OpenAPI docs at /docs). Settings come from PGREC_* variables."""
    import uvicorn

    from engine.api.logs import configure_logging

    configure_logging(get_settings().log_level)
    if workers > 1 or metrics_dir is not None:
        # prometheus-client's multiprocess mode is switched on by this variable; it must be set before the
        # workers import prometheus_client, and the directory must start empty
        mdir = metrics_dir or Path(tempfile.mkdtemp(prefix="pgrec-metrics-"))
        mdir.mkdir(parents=True, exist_ok=True)
        for f in mdir.glob("*.db"):
            f.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
    uvicorn.run("engine.api.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                access_log=False, log_config=None, timeout_graceful_shutdown=10)


# ---------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what uses the key")],
    scope: Annotated[list[str], typer.Option("--scope", "-s", help="read, write or admin (repeatable)")],
) -> None:
    """Create an API key. The token is printed once; only its sha256 is stored."""
    from engine.api.keys import create_key

    with db_connection() as conn:
        try:
            token, info = create_key(conn, name, scope)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    console.print(f"key {info.key_id} ({info.name}, scopes {','.join(info.scopes)}):")
    console.print(token, highlight=False, soft_wrap=True)


@keys_app.command("revoke")
def keys_revoke(key_id: int) -> None:
    """Revoke a key (every service copy refuses it within its key cache time, 5 s by default)."""
    from engine.api.keys import revoke_key

    with db_connection() as conn:
        revoke_key(conn, key_id)
    console.print(f"key {key_id} revoked")


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="also revoked keys")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The keys (id, name, prefix, scopes); tokens are never stored."""
    from engine.api.keys import list_keys

    with db_connection() as conn:
        keys = list_keys(conn, include_revoked=include_revoked)
    if as_json:
        console.print_json(json.dumps([k.__dict__ for k in keys], default=str))
        return
    t = Table("id", "name", "prefix", "scopes", "created", "revoked")
    for k in keys:
        t.add_row(str(k.key_id), k.name, k.prefix, ",".join(k.scopes), f"{k.created_at:%Y-%m-%d %H:%M}",
                  f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "")
    console.print(t)


# ---------------------------------------------------------------- report


@report_app.command("online")
def report_online(
    since: Annotated[datetime | None, typer.Option(help="impressions served at or after this time")] = None,
    surface: Annotated[str | None, typer.Option(help="one surface only")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Impressions, CTR and conversion per surface, experiment, variant and position (impressions joined with
    events)."""
    with db_connection() as conn:
        rows = experiments.online_report(conn, since=since, surface=surface)
    if as_json:
        console.print_json(json.dumps([{**r.__dict__, "ctr": r.ctr, "conversion_rate": r.conversion_rate}
                                       for r in rows], default=str))
        return
    if not rows:
        console.print("no impressions" + (f" since {since}" if since else ""))
        return
    t = Table("surface", "experiment", "variant", "position", "impressions", "clicks", "CTR", "conversions",
              "conv. rate", title="online report")
    for r in rows:
        t.add_row(r.surface, r.experiment or "-", r.variant or "-", "all" if r.position is None else str(r.position),
                  f"{r.impressions:,}", f"{r.clicks:,}", f"{r.ctr:.2%}", f"{r.conversions:,}",
                  f"{r.conversion_rate:.2%}", style="bold" if r.position is None else None)
    console.print(t)


# ---------------------------------------------------------------- experiments


def _variant_spec(text: str) -> experiments.VariantSpec:
    """``NAME=SHARE[,model=VERSION][,policy_set=SET]`` as a VariantSpec, or a clear error."""
    head, *rest = text.split(",")
    name, sep, share = head.partition("=")
    if not sep:
        raise fail(f"--variant {text!r}: expected NAME=SHARE[,model=VERSION][,policy_set=SET]")
    extra: dict[str, str] = {}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep or key not in ("model", "policy_set") or key in extra:
            raise fail(f"--variant {text!r}: {part!r} is not model=VERSION or policy_set=SET (each at most once)")
        extra[key] = value
    try:
        share_f = float(share)
        model = int(extra["model"]) if "model" in extra else None
    except ValueError:
        raise fail(f"--variant {text!r}: the share must be a number and the model a version number") from None
    return experiments.VariantSpec(name.strip(), share_f, model, extra.get("policy_set") or None)


@experiments_app.command("create")
def experiments_create(
    name: Annotated[str, typer.Argument(help="experiment name (the hash salt: users keep their variant)")],
    variant: Annotated[list[str], typer.Option(
        "--variant", "-v", help="NAME=SHARE[,model=VERSION][,policy_set=SET], repeatable; shares sum to 1")],
    surface: Annotated[str, typer.Option(help="the surface it runs on (one active experiment per surface)")] = "default",
    description: Annotated[str | None, typer.Option(help="free text")] = None,
) -> None:
    """Start an experiment (an arm's ranker is compiled to SQL, so SQL-only apps serve it too)."""
    specs = [_variant_spec(v) for v in variant]
    with db_connection() as conn:  # a refusal (InvalidRequest, NotFound) is printed, exit code 1
        exp = experiments.create(conn, name, surface, specs, description)
    console.print(f"experiment {exp.name!r} on surface {exp.surface!r}: " + ", ".join(
        f"{v.name} {v.share:g}" for v in exp.variants))


@experiments_app.command("list")
def experiments_list(
    include_ended: Annotated[bool, typer.Option("--all", help="ended experiments too")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The experiments and their variants."""
    with db_connection() as conn:
        exps = experiments.list_experiments(conn, include_ended=include_ended)
    if as_json:
        console.print_json(json.dumps([{**e.__dict__, "variants": [v.__dict__ for v in e.variants]} for e in exps]))
        return
    if not exps:
        console.print("no experiments" if include_ended else "no active experiments")
        return
    t = Table("experiment", "surface", "active", "variant", "share", "model", "policy set", title="experiments")
    for e in exps:
        for v in e.variants:
            t.add_row(e.name, e.surface, "yes" if e.active else "no", v.name, f"{v.share:g}",
                      "-" if v.model_version is None else str(v.model_version), v.policy_set or "-")
    console.print(t)


@experiments_app.command("end")
def experiments_end(name: Annotated[str, typer.Argument(help="experiment name")]) -> None:
    """Stop an experiment; its impressions stay for the report."""
    with db_connection() as conn:
        experiments.end(conn, name)
    console.print(f"experiment {name!r} ended")


# ---------------------------------------------------------------- bench


@bench_app.command("http")
def bench_http(
    items: Annotated[int, typer.Option(help="generated items (the data of `pgrec bench serve`)")] = 100_000,
    users: Annotated[int, typer.Option(help="generated users")] = 20_000,
    events: Annotated[int, typer.Option(help="generated events")] = 2_000_000,
    seconds: Annotated[float, typer.Option(help="measured time, after a 3 s warm-up")] = 20.0,
    clients: Annotated[int, typer.Option(help="concurrent keep-alive clients")] = 32,
    workers: Annotated[int, typer.Option(help="uvicorn workers")] = 2,
    k: Annotated[int, typer.Option("--k")] = 10,
    port: int = 8765,
    reuse: Annotated[bool, typer.Option("--reuse/--fresh", help="reuse data of the same size if present")] = True,
    ranker: Annotated[bool, typer.Option("--ranker/--no-ranker",
                                         help="train and serve a ranker, or serve with the fallback score")] = True,
    write: Annotated[Path | None, typer.Option("--write", help="update this benchmarks file (section HTTP)")] = None,
) -> None:
    """Recommendations/s, p50/p95/p99 and errors of `pgrec serve` under concurrent clients on loopback."""
    from engine.bench.http import HttpBenchConfig, run
    from engine.db import DatabaseError
    from engine.errors import PgrecError

    cfg = HttpBenchConfig(items=items, users=users, events=events, seconds=seconds, clients=clients,
                          workers=workers, k=k, port=port, reuse=reuse, ranker=ranker)
    try:
        for line in run(get_settings(), cfg, write=write, say=console.print):
            console.print(line, highlight=False)
    except (DatabaseError, PgrecError, RuntimeError) as exc:
        raise fail(str(exc)) from None
