"""`pgrec policy ...` end to end on a small generated world: add, list, show, disable / enable, update, explain,
item sets, delete, and bad input refused cleanly (no traceback, nothing written)."""

from __future__ import annotations

import json

import test_candidates_cli
from conftest import TestDB
from typer.testing import CliRunner

from engine.cli import app

world = test_candidates_cli.world


def _cli(*args: str, ok: bool = True) -> str:
    res = CliRunner().invoke(app, ["policy", *args])
    assert (res.exit_code == 0) == ok, res.output
    if not ok:
        assert res.exit_code in (1, 2) and "Traceback" not in res.output
    return " ".join(res.output.split())


def _count(db: TestDB) -> int:
    return int(db.scalar("SELECT count(*) FROM pgrec.policies"))


def test_policy_commands(world: TestDB) -> None:
    kinds = _cli("kinds")
    assert "exclude_negative" in kinds and "mmr" in kinds and "holdout" in kinds
    top = world.scalar("SELECT i.item_id FROM pgrec.events e JOIN pgrec.items i USING (item_key) "
                       "WHERE e.polarity = 1 GROUP BY i.item_id ORDER BY count(*) DESC, i.item_id LIMIT 1")
    before = _count(world)
    out = _cli("add", "no-top", "blocklist", "-p", json.dumps({"items": [top]}), "--description", "test")
    assert "added policy no-top" in out
    _cli("add", "pin-top", "pin", "-p", json.dumps({"items": [top], "positions": [2]}), "--priority", "50",
         "--disabled")
    assert _count(world) == before + 2
    listed = {p["name"]: p for p in json.loads(_cli("list", "--json"))}
    assert listed["no-top"]["enabled"] and not listed["pin-top"]["enabled"]
    assert listed["pin-top"]["priority"] == 50 and listed["no-top"]["params"] == {"items": [top]}
    assert [p["name"] for p in json.loads(_cli("list", "--enabled-only", "--json"))].count("pin-top") == 0
    assert "policies" in _cli("list")  # the table

    # explain: the blocklist drops the top item for a user, the list before and after each step
    out = _cli("explain", "u1", "--k", "5")
    assert "input" in out and "no-top" in out and "final list for u1 on default" in out
    assert f" {top}(" not in out.split("no-top", 1)[1].split("final list", 1)[0]  # gone after the blocklist
    # enable the pin: the blocked item stays out (a pin never bypasses a filter), versions move on
    assert "policy pin-top is enabled (version 2)" in _cli("enable", "pin-top")
    assert top not in _cli("explain", "u1", "--k", "5").split("final list", 1)[1]
    assert "policy no-top is disabled (version 2)" in _cli("disable", "no-top")
    final = _cli("explain", "u1", "--k", "5").split("final list", 1)[1]
    assert top in final and "pinned by" in final
    shown = _cli("show", "no-top")
    assert "kind: blocklist" in shown and "v1 insert" in shown and "v2 update" in shown
    assert "policy no-top is at version 3" in _cli("update", "no-top", "--priority", "10")
    assert world.scalar("SELECT priority FROM pgrec.policies WHERE name = 'no-top'") == 10

    # item sets
    _cli("itemset", "add", "editorial", top, "i1")
    assert "editorial" in _cli("itemset", "list")

    # refused cleanly, nothing written
    n = _count(world)
    for args, message in [
        (["add", "x", "boost", "-p", '{"multiply": 1e400}'], "--params is not valid JSON: 1e400 is not a finite number"),
        (["add", "x", "boost", "-p", '{"multiply": NaN}'], "--params is not valid JSON: NaN is not a number JSON allows"),
        (["add", "x", "boost", "-p", "{nope"], "--params is not valid JSON"),
        (["add", "x", "boost", "-p", '{"multiply": "a lot", "predicate": {"field": "score", "op": "exists"}}'],
         "params.multiply"),
        (["add", "x", "teleport"], "unknown policy kind 'teleport'"),
        (["add", "x", "boost", "--priority", "-99999999999", "-p", '{"multiply": 2}'], "-2147483648"),
        (["add", "x", "attribute_filter", "-p",
          '{"predicate": {"property": "a; DROP TABLE pgrec.items", "op": "exists"}}', "--surface", "nowhere"],
         "nowhere"),
        (["show", "no-such-policy"], "no-such-policy"),
        (["disable", "no-such-policy"], "no-such-policy"),
        (["explain", "u1", "--surface", "nowhere"], "unknown surface"),
    ]:
        assert message in _cli(*args, ok=False), args
    assert _count(world) == n
    assert world.scalar("SELECT count(*) FROM pgrec.items") > 0

    assert "no-top" in _cli("delete", "no-top")
    assert _count(world) == n - 1
