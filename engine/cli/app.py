"""The typer application and its command groups. Command modules register on these groups."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="pgrec", help="pgrec: recommendations inside PostgreSQL.", no_args_is_help=True, add_completion=False
)
db_app = typer.Typer(help="Schema versions (alembic) and the embedded server.", no_args_is_help=True)
import_app = typer.Typer(help="Bulk imports (all-or-nothing per file).", no_args_is_help=True)
train_app = typer.Typer(help="Train models: cooccurrence, neighbours, ease, retrieval, ranker, all.",
                        no_args_is_help=True)
eval_app = typer.Typer(help="Offline evaluation on a temporal split.", invoke_without_command=True)
bench_app = typer.Typer(help="Benchmarks that print numbers.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
policy_app = typer.Typer(help="Re-ranking policies (rows in pgrec.policies).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the HTTP service.", no_args_is_help=True)
report_app = typer.Typer(help="Reports.", no_args_is_help=True)
experiments_app = typer.Typer(help="A/B experiments: variants per surface by model version and/or policy set.",
                              no_args_is_help=True)
config_app = typer.Typer(help="Settings the SQL functions read (pgrec.config), checked on write.", no_args_is_help=True)
sources_app = typer.Typer(help="Candidate sources per surface (pgrec.candidate_sources).", no_args_is_help=True)

app.add_typer(db_app, name="db")
app.add_typer(import_app, name="import")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")
app.add_typer(models_app, name="models")
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
app.add_typer(report_app, name="report")
app.add_typer(experiments_app, name="experiments")
app.add_typer(sources_app, name="sources")
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error (no traceback) and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}")  # a message is text, not markup: "[a-z]" stays
    return typer.Exit(code)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a number JSON allows")


def parse_json(text: str, what: str) -> Any:
    """A JSON argument, or a clear error; NaN, Infinity and numbers beyond a double's range are refused
    (PostgreSQL's jsonb cannot hold them)."""
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise fail(f"{what} is not valid JSON: {exc}") from None


def parse_json_or_text(text: str, what: str) -> Any:
    """A value typed on the command line: JSON when it parses (``100``, ``0.5``, ``true``, ``[...]``), else the
    text itself; NaN, Infinity and numbers beyond a double's range are refused as in :func:`parse_json`."""
    try:
        return json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except json.JSONDecodeError:
        return text
    except ValueError as exc:
        raise fail(f"{what} is not valid JSON: {exc}") from None


AsOf = Annotated[str | None, typer.Option("--as-of", help="a past moment (ISO 8601): only events before it count")]


def parse_as_of(value: str | None) -> datetime | None:
    """The ``--as-of`` option as a time, or a clear error."""
    from engine.ingest import parse_time

    if value is None:
        return None
    try:
        return parse_time(value, "--as-of", required=True)
    except ValueError as exc:
        raise fail(str(exc)) from None
