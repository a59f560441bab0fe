"""CLI commands for the candidate sources of each surface (registered on ``sources_app``): ``pgrec sources
list|set|params``. The database checks every row written (sql/sources/v1.sql); values typed here are passed
through as JSON so that the check decides."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import psycopg
import typer
from psycopg.types.json import Jsonb
from rich.markup import escape
from rich.table import Table

from engine.cli.app import console, fail, parse_json_or_text, sources_app
from engine.cli.core import db_connection
from engine.sql import query


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"surface": r[0], "source": r[1], "enabled": r[2], "quota": round(float(r[3]), 6),
            "fallback_order": r[4], "params": r[5]}


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for col in ("surface", "source", "on", "quota", "fallback"):
        t.add_column(col)
    t.add_column("params", overflow="fold")
    for r in rows:
        t.add_row(r["surface"], r["source"], "yes" if r["enabled"] else "no", f"{r['quota']:g}",
                  "" if r["fallback_order"] is None else str(r["fallback_order"]),
                  escape(json.dumps(r["params"], separators=(",", ":"))))
    return t


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value``: the value as JSON when it parses (``100``, ``0.5``, ``true``), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise fail(f"--param {text!r}: expected key=value")
    return key.strip(), parse_json_or_text(value, f"--param {key.strip()}")


@sources_app.command("list")
def sources_list(
    surface: Annotated[str | None, typer.Option(help="only this surface (its own rows, else the 'default' ones)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The rows of pgrec.candidate_sources: per surface and source, enabled, quota, fallback order, params."""
    note = None
    with db_connection() as conn:
        rows = [_row(r) for r in conn.execute(query("sources.rows"), {"surface": surface}).fetchall()]
        if surface is not None and not rows:
            if not conn.execute(query("sources.surface_exists"), {"surface": surface}).fetchone()[0]:  # type: ignore[index]
                raise fail(f"unknown surface {surface!r} (the rows of pgrec.surfaces)")
            note = f"surface {surface} has no rows of its own: it uses the 'default' rows"
            rows = [_row(r) for r in conn.execute(query("sources.rows"), {"surface": "default"}).fetchall()]
    if as_json:
        print(json.dumps(rows))
        return
    if note:
        console.print(note)
    console.print(_table(rows, "candidate sources"))


@sources_app.command("set")
def sources_set(
    surface: Annotated[str, typer.Argument(help="the surface (created, with a copy of the 'default' rows, if new)")],
    source: Annotated[str, typer.Argument(help="ann, history, trending, fresh or popular")],
    quota: Annotated[float | None, typer.Option(help="share of n taken from the source (0..1)")] = None,
    fallback_order: Annotated[int | None, typer.Option(help="fill order when the union is short (1 first)")] = None,
    no_fallback: Annotated[bool, typer.Option("--no-fallback", help="not a fallback source")] = False,
    param: Annotated[list[str] | None, typer.Option("--param", help="key=value (value parsed as JSON, else text)")] = None,
    unset_param: Annotated[list[str] | None, typer.Option("--unset-param", help="remove a key (its default applies)")] = None,
    enable: Annotated[bool | None, typer.Option("--enable/--disable", help="run the source or not")] = None,
) -> None:
    """Change one source of a surface. A surface without rows of its own first gets a copy of the 'default'
    rows (and a row in pgrec.surfaces if it has none), so only this source differs from the defaults."""
    if quota is not None and not (math.isfinite(quota) and 0 <= quota <= 1):
        raise fail(f"--quota must be a number between 0 and 1, got {quota:g}")
    if fallback_order is not None and not 1 <= fallback_order <= 2147483647:
        raise fail(f"--fallback-order must be between 1 and 2147483647, got {fallback_order}")
    if fallback_order is not None and no_fallback:
        raise fail("give --fallback-order or --no-fallback, not both")
    set_params = dict(parse_param(p) for p in param or [])
    unset = list(unset_param or [])
    if both := sorted(set(set_params) & set(unset)):
        raise fail(f"both --param and --unset-param for {', '.join(both)}")
    if quota is None and fallback_order is None and not no_fallback and not set_params and not unset and enable is None:
        raise fail("nothing to change: give --quota, --fallback-order/--no-fallback, --param, --unset-param, "
                   "--enable or --disable")
    notes: list[str] = []
    args = {"surface": surface, "source": source}
    with db_connection() as conn, conn.transaction():
        names = conn.execute(query("sources.source_names")).fetchone()[0]  # type: ignore[index]
        if source not in names:
            raise fail(f"unknown source {source!r}: one of {', '.join(names)}")
        try:
            added = conn.execute(query("sources.add_surface"),
                                 {**args, "description": "created by pgrec sources set"}).rowcount
        except psycopg.errors.CheckViolation:
            raise fail(f"{surface!r} is not a valid surface name (pgrec.surfaces: lowercase letters, digits, "
                       "_ . -, up to 63 characters)") from None
        if added:
            notes.append(f"created surface {surface}")
        if conn.execute(query("sources.copy_default_rows"), args).rowcount:
            notes.append(f"copied the 'default' rows to surface {surface}")
        if conn.execute(query("sources.copy_default_row"), args).rowcount:
            notes.append(f"copied the 'default' row of {source} to surface {surface}")
        elif quota is not None and conn.execute(query("sources.add_row"), {**args, "quota": quota}).rowcount:
            notes.append(f"added source {source} to surface {surface}")
        row = conn.execute(query("sources.update_row"), {
            **args, "quota": quota, "fallback_order": fallback_order, "no_fallback": no_fallback,
            "enabled": enable, "set_params": Jsonb(set_params), "unset_params": unset}).fetchone()
        if row is None:
            raise fail(f"surface {surface} has no row for source {source} and 'default' has none to copy: "
                       "give --quota")
    for n in notes:
        console.print(n)
    console.print(_table([_row(row)], f"{surface} / {source}"))


@sources_app.command("params")
def sources_params(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The known params keys of each source: what a valid value is, the default and the meaning."""
    with db_connection() as conn:
        rows = conn.execute(query("sources.param_specs")).fetchall()
    if as_json:
        out: dict[str, list[dict[str, Any]]] = {}
        for source, param, expects, default, meaning in rows:
            out.setdefault(source, [])
            if param is not None:
                out[source].append({"param": param, "expects": expects, "default": default, "meaning": meaning})
        print(json.dumps(out))
        return
    last = None
    for source, param, expects, default, meaning in rows:
        if source != last:
            console.print(f"[bold]{source}[/]" + ("" if param else ": no parameters"))
            last = source
        if param is not None:
            console.print(escape(f"  {param}: {meaning}; {expects}; default {default}"), highlight=False)

