"""CLI commands for policies (registered on the groups of engine.cli.app): ``pgrec policy ...`` and
``pgrec bench policies``."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from engine import policies
from engine.cli.app import bench_app, console, fail, parse_json, policy_app
from engine.cli.core import db_connection
from engine.config import get_settings
from engine.errors import InvalidRequest, NotFound

itemset_app = typer.Typer(help="Named item sets that policies refer to.", no_args_is_help=True)
policy_app.add_typer(itemset_app, name="itemset")


def _json(text: str | None, what: str) -> Any:
    return None if text is None else parse_json(text, what)


def _when(text: str | None, what: str) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise fail(f"{what}: expected an ISO 8601 time, got {text!r}") from None


def _short(value: Any, width: int = 60) -> str:
    s = json.dumps(value, separators=(",", ":")) if value is not None else ""
    return s if len(s) <= width else s[: width - 1] + "…"


@policy_app.command("add")
def policy_add(
    name: str,
    kind: Annotated[str, typer.Argument(help=f"one of: {', '.join(policies.KINDS)}")],
    params: Annotated[str, typer.Option("--params", "-p", help="parameters as a JSON object")] = "{}",
    surface: Annotated[str | None, typer.Option(help="only on this surface (default: every surface)")] = None,
    segment: Annotated[str | None, typer.Option(help="predicate on user properties (JSON)")] = None,
    priority: Annotated[int, typer.Option(help="lower runs first", min=-2147483648, max=2147483647)] = 100,
    disabled: Annotated[bool, typer.Option("--disabled", help="write it disabled")] = False,
    starts_at: Annotated[str | None, typer.Option(help="active from (ISO 8601)")] = None,
    ends_at: Annotated[str | None, typer.Option(help="active until, exclusive (ISO 8601)")] = None,
    policy_set: Annotated[str | None, typer.Option("--set", help="only in this policy set (A/B variant)")] = None,
    description: Annotated[str | None, typer.Option(help="why it exists")] = None,
    actor: Annotated[str | None, typer.Option(help="who writes it (audit)")] = None,
) -> None:
    """Add a policy (the database checks the parameters of its kind; see docs/policies.md)."""
    with db_connection() as conn:
        try:
            pol = policies.add(conn, name, kind, _json(params, "--params"), surface=surface,
                               segment=_json(segment, "--segment"), priority=priority, enabled=not disabled,
                               starts_at=_when(starts_at, "--starts-at"), ends_at=_when(ends_at, "--ends-at"),
                               policy_set=policy_set, description=description, actor=actor)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    console.print(f"added policy {pol.name} (id {pol.policy_id}, {pol.kind}, version {pol.version})")


@policy_app.command("list")
def policy_list(
    surface: Annotated[str | None, typer.Option(help="only the policies that apply to this surface")] = None,
    enabled_only: Annotated[bool, typer.Option("--enabled-only")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON list (for scripts)")] = False,
) -> None:
    """The policies in the order they apply (priority, then kind)."""
    with db_connection() as conn:
        rows = policies.list_(conn, surface=surface, include_disabled=not enabled_only)
    if as_json:
        print(json.dumps([vars(p) for p in rows], default=str))
        return
    t = Table(title="policies")
    for col in ("id", "name", "kind", "on", "prio", "surface", "set", "window", "segment", "params", "v"):
        t.add_column(col)
    for p in rows:
        window = "" if p.starts_at is None and p.ends_at is None else (
            f"{p.starts_at.isoformat() if p.starts_at else '…'} → {p.ends_at.isoformat() if p.ends_at else '…'}")
        t.add_row(str(p.policy_id), p.name, p.kind, "yes" if p.enabled else "no", str(p.priority), p.surface or "*",
                  p.policy_set or "*", window, _short(p.segment, 30), _short(p.params), str(p.version))
    console.print(t)


def _set_enabled(ref: str, enabled: bool, actor: str | None) -> None:
    with db_connection() as conn:
        try:
            pol = policies.set_enabled(conn, ref, enabled, actor=actor)
        except NotFound as exc:
            raise fail(str(exc)) from None
    console.print(f"policy {pol.name} is {'enabled' if pol.enabled else 'disabled'} (version {pol.version})")


@policy_app.command("enable")
def policy_enable(ref: Annotated[str, typer.Argument(help="name or id")], actor: str | None = None) -> None:
    """Enable a policy."""
    _set_enabled(ref, True, actor)


@policy_app.command("disable")
def policy_disable(ref: Annotated[str, typer.Argument(help="name or id")], actor: str | None = None) -> None:
    """Disable a policy (it stays, with its history)."""
    _set_enabled(ref, False, actor)


@policy_app.command("show")
def policy_show(ref: Annotated[str, typer.Argument(help="name or id")]) -> None:
    """A policy and its history of versions."""
    with db_connection() as conn:
        try:
            pol = policies.get(conn, ref)
            hist = policies.history(conn, ref)
        except NotFound as exc:
            raise fail(str(exc)) from None
    for key, value in vars(pol).items():
        console.print(f"[bold]{key}[/]: {json.dumps(value) if isinstance(value, dict) else value}")
    console.print("[bold]history[/]:")
    for h in hist:
        console.print(f"  v{h['version']} {h['action']} by {h['changed_by']} at {h['changed_at']:%Y-%m-%d %H:%M:%S}")


@policy_app.command("update")
def policy_update(
    ref: Annotated[str, typer.Argument(help="name or id")],
    params: Annotated[str | None, typer.Option("--params", "-p", help="new parameters (JSON object)")] = None,
    priority: Annotated[int | None, typer.Option(min=-2147483648, max=2147483647)] = None,
    actor: str | None = None,
) -> None:
    """Change a policy's parameters or priority (a new version)."""
    with db_connection() as conn:
        try:
            pol = policies.update(conn, ref, params=_json(params, "--params"), priority=priority, actor=actor)
        except (InvalidRequest, NotFound) as exc:
            raise fail(str(exc)) from None
    console.print(f"policy {pol.name} is at version {pol.version}")


@policy_app.command("delete")
def policy_delete(ref: Annotated[str, typer.Argument(help="name or id")]) -> None:
    """Delete a policy (its versions stay in pgrec.policy_audit)."""
    with db_connection() as conn:
        policies.delete(conn, ref)
    console.print(f"deleted policy {ref}")


@policy_app.command("kinds")
def policy_kinds() -> None:
    """The kinds and their parameters (with defaults)."""
    t = Table(title="policy kinds (applied by priority, then in this order)")
    t.add_column("kind")
    t.add_column("parameters")
    for kind in policies.KINDS:
        fields = []
        for fname, f in policies.PARAMS[kind].model_fields.items():
            label = f.alias or fname
            fields.append(label if f.is_required() else f"{label}={f.default if f.default_factory is None else '[]'}")
        t.add_row(kind, ", ".join(fields))
    console.print(t)


@policy_app.command("explain")
def policy_explain(
    user: Annotated[str, typer.Argument(help="user id")],
    surface: Annotated[str, typer.Option()] = "default",
    k: Annotated[int, typer.Option(help="list length")] = 10,
    show: Annotated[int | None, typer.Option(help="items per snapshot (default k)")] = None,
    as_of: Annotated[str | None, typer.Option(help="ISO 8601 time (default now)")] = None,
    context: Annotated[str | None, typer.Option(help="request context JSON (exclude, include_only, params)")] = None,
    policy_set: Annotated[str | None, typer.Option("--set")] = None,
) -> None:
    """The user's ranked list before and after each policy: the candidates scored as they are served (the
    active ranker, or the sources' rank fusion without one), nothing logged."""
    with db_connection() as conn:
        try:
            res = policies.explain(conn, user, surface, k=k, as_of=_when(as_of, "--as-of"),
                                   context=_json(context, "--context"), policy_set=policy_set, show=show)
        except (InvalidRequest, NotFound) as exc:
            raise fail(str(exc)) from None
    for step in res.steps or []:
        title = step["policy"] if step["kind"] == "input" else f"{step['policy']} {step['name']}"
        dropped = f", dropped {step['dropped']}" if step.get("dropped") else ""
        items = "  ".join(f"{i['item_id']}({i['score']:.4g})" if i["score"] is not None else i["item_id"]
                          for i in step["items"])
        console.print(f"[bold]{title}[/]{dropped}\n  {items}")
    if res.skipped:
        console.print(f"[bold]skipped[/]: {res.skipped}")
    t = Table(title=f"final list for {user} on {surface}" + (" (holdout)" if res.holdout else ""))
    for col in ("pos", "item", "score", "sources", "policies"):
        t.add_column(col)
    for it in res.items:
        t.add_row(str(it.position), it.item_id, f"{it.score:.4g}" if it.score is not None else "",
                  ",".join(it.reasons["sources"]),
                  ", ".join(f"{p['action']} by {p['policy']}" for p in it.reasons["policies"]))
    console.print(t)
    console.print(f"dropped: {res.dropped}")


@itemset_app.command("add")
def itemset_add(
    name: str,
    items: Annotated[list[str], typer.Argument(help="item ids (replaces the set)")],
    description: str | None = None,
    actor: str | None = None,
) -> None:
    """Create or replace an item set."""
    with db_connection() as conn:
        try:
            got = policies.put_item_set(conn, name, items, description=description, actor=actor)
        except InvalidRequest as exc:
            raise fail(str(exc)) from None
    console.print(f"item set {name}: {len(got)} items")


@itemset_app.command("list")
def itemset_list() -> None:
    """The item sets."""
    with db_connection() as conn:
        sets = policies.item_sets(conn)
    if not sets:
        console.print("no item sets")
    for name, items in sets.items():
        console.print(f"{name} ({len(items)}): {' '.join(items[:20])}{' …' if len(items) > 20 else ''}")


@itemset_app.command("delete")
def itemset_delete(name: str) -> None:
    """Delete an item set (refused while a policy uses it)."""
    with db_connection() as conn:
        try:
            policies.delete_item_set(conn, name)
        except (InvalidRequest, NotFound) as exc:
            raise fail(str(exc)) from None
    console.print(f"deleted item set {name}")


@bench_app.command("policies")
def bench_policies(
    candidates: Annotated[int, typer.Option(help="scored items per request")] = 500,
    k: Annotated[int, typer.Option()] = 10,
    runs: Annotated[int, typer.Option()] = 300,
    kinds: Annotated[str | None, typer.Option(help="comma-separated subset of the ten benchmark policies")] = None,
    neighbours: Annotated[bool, typer.Option("--neighbours", help="exclude_negative also drops close neighbours")] = False,
) -> None:
    """Re-ranking speed: pgrec.rerank of N scored candidates to k with ten active policies (p50/p95/p99).
    Runs in a transaction that is rolled back: nothing is left behind."""
    from engine.bench import policies as bench

    for line in bench.run(get_settings(), candidates=candidates, k=k, runs=runs,
                          kinds=kinds.split(",") if kinds is not None else None, neighbours=neighbours):
        console.print(line)
