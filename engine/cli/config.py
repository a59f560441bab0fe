"""CLI commands for pgrec.config (registered on ``config_app``): ``pgrec config list|set``. The database checks
every value written (sql/config/v1.sql); the value typed here is passed through as JSON so that the check
decides."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from psycopg.types.json import Jsonb
from rich.markup import escape

from engine.cli.app import config_app, console, parse_json_or_text
from engine.cli.core import db_connection
from engine.sql import query


@config_app.command("list")
def config_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every setting the SQL functions read: its value, what a valid value is, and what to run after a change."""
    with db_connection() as conn:
        rows = conn.execute(query("config.rows")).fetchall()
    if as_json:
        print(json.dumps([{"key": k, "value": v, "expects": e, "fixed": f, "after_change": a, "description": d}
                          for k, v, e, f, a, d, _ in rows]))
        return
    for key, value, expects, fixed, after, description, _ in rows:
        shown = "(missing: the built-in default applies)" if value is None else json.dumps(value)
        console.print(escape(f"{key} = {shown}"), style="bold", highlight=False)
        notes = [n for n in (description, expects, "fixed at install" if fixed else None,
                             f"after a change run: {after}" if after else None) if n]
        console.print(escape("  " + "; ".join(notes)), highlight=False)


@config_app.command("set", context_settings={"ignore_unknown_options": True})
def config_set(
    key: Annotated[str, typer.Argument(help="a key of `pgrec config list`")],
    value: Annotated[str, typer.Argument(help="the value as JSON (14, 0.5, '\"country\"', '[\"click\"]'); "
                                              "text that is not JSON is taken as a string")],
) -> None:
    """Change one setting. The database refuses an unknown key, a value of the wrong type or out of range, and
    a change to a key fixed at install, naming the key and what it expects."""
    parsed = parse_json_or_text(value, key)
    with db_connection() as conn, conn.transaction():
        row = conn.execute(query("config.set"), {"key": key, "value": Jsonb(parsed)}).fetchone()
    assert row is not None  # the insert returns its row or raises
    console.print(escape(f"{row[0]} = {json.dumps(row[1])}"), highlight=False)
    if row[2]:
        console.print(f"now run: {row[2]}")
