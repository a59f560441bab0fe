"""Error answers of the HTTP service: non-finite numbers are 422s naming the field (and the 422 always renders),
a database fault that is not the caller's is a 500 without SQL text, and 422s name the request field."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from api_support import Api

pytest_plugins = ("api_support",)


def _strict_json(text: str) -> Any:
    """The answer as JSON, refusing NaN / Infinity (which no JSON client accepts)."""
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON number {token} in the answer: {text[:300]}")
    return json.loads(text, parse_constant=refuse)


def _seed(api: Api) -> None:
    c, h = api.client, api.write
    for i in ("a1", "a2", "a3"):
        assert c.put(f"/v1/items/{i}", json={"categories": ["x"]}, headers=h).status_code == 200
    assert c.post("/v1/events", json={"user_id": "u1", "item_id": "a1", "event_type": "click"},
                  headers=h).status_code == 200


# (method, path, scope, raw body, a field the 422 must name)
NON_FINITE: list[tuple[str, str, str, str, str]] = [
    ("POST", "/v1/recommendations", "read", '{"user_id": "u5", "k": NaN}', "k"),
    ("POST", "/v1/recommendations", "read", '{"user_id": "u5", "context": {"params": {"x": NaN}}}', "context"),
    ("POST", "/v1/events", "write",
     '{"user_id": "u1", "item_id": "a1", "event_type": "view", "value": 1e400}', "value"),
    ("POST", "/v1/events", "write",
     '{"user_id": "u1", "item_id": "a1", "event_type": "view", "value": NaN}', "value"),
    ("POST", "/v1/events", "write",
     '{"user_id": "u1", "item_id": "a1", "event_type": "view", "properties": {"p": -Infinity}}', "properties"),
    ("POST", "/v1/events/batch", "write",
     '{"events": [{"user_id": "u1", "item_id": "a1", "event_type": "view", "value": Infinity}]}', "value"),
    ("PUT", "/v1/users/x", "write", '{"properties": {"age": NaN}}', "properties"),
    ("PUT", "/v1/items/n50", "write", '{"properties": {"price": 1e400}}', "properties"),
    ("PUT", "/v1/items/n50", "write", '{"properties": {"deep": [{"a": [1, -1e999]}]}}', "properties"),
    ("PUT", "/v1/items/a1/embedding", "write", '{"vector": [1.0, NaN]}', "vector"),
    ("POST", "/v1/admin/experiments", "admin",
     '{"name": "e1", "variants": [{"name": "a", "share": NaN}]}', "share"),
    ("POST", "/v1/admin/experiments", "admin",
     '{"name": "e1", "variants": [{"name": "a", "share": 1, "model_version": Infinity}]}', "model_version"),
    ("POST", "/v1/admin/policies", "admin", '{"name": "b", "kind": "boost", "params": {"multiply": NaN}}', "params"),
    ("POST", "/v1/admin/policies", "admin", '{"name": "b", "kind": "boost", "priority": 1e400}', "priority"),
]


@pytest.mark.parametrize(("method", "path", "scope", "body", "field"), NON_FINITE,
                         ids=[f"{m} {p} {f}" for m, p, _, _, f in NON_FINITE])
def test_non_finite_numbers_are_422_naming_the_field(api: Api, method: str, path: str, scope: str, body: str,
                                                     field: str) -> None:
    _seed(api)
    counts = "SELECT (SELECT count(*) FROM pgrec.events), (SELECT count(*) FROM pgrec.items), " \
             "(SELECT count(*) FROM pgrec.policies), (SELECT count(*) FROM pgrec.experiments)"
    before = api.db.conn.execute(counts).fetchone()
    r = api.client.request(method, path, content=body.encode(),
                           headers={**getattr(api, scope), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = _strict_json(r.text)["detail"]
    assert field in {str(p) for d in detail for p in d["loc"]}, r.text
    assert api.db.conn.execute(counts).fetchone() == before


def test_non_finite_number_message_names_the_property(api: Api) -> None:
    r = api.client.put("/v1/users/x", content=b'{"properties": {"size": {"age": NaN}}}',
                       headers={**api.write, "content-type": "application/json"})
    assert r.status_code == 422 and "size.age" in _strict_json(r.text)["detail"][0]["msg"], r.text


# ---------------------------------------------------------------- database faults


FAULTS = [("exp(-1000::float8)", "22003"), ("1 / 0", "22012"), ("'abc'::int", "22P02"),
          ("pgrec.test_raise()", "P0001")]


@pytest.mark.parametrize(("expr", "sqlstate"), FAULTS, ids=[s for _, s in FAULTS])
def test_a_database_fault_is_500_without_sql_text(api: Api, caplog: pytest.LogCaptureFixture, expr: str,
                                                  sqlstate: str) -> None:
    """A data exception raised inside SQL that the caller did not cause (here: from triggers) is no 422."""
    _seed(api)
    conn = api.db.conn
    conn.execute("CREATE FUNCTION pgrec.test_raise() RETURNS int LANGUAGE plpgsql AS "
                 "$$ BEGIN RAISE EXCEPTION 'not a caller error'; END $$")
    conn.execute(f"CREATE FUNCTION pgrec.test_fault() RETURNS trigger LANGUAGE plpgsql AS "
                 f"$$ BEGIN PERFORM {expr}; RETURN NEW; END $$")
    for table in ("users", "policies", "impressions"):
        conn.execute(f"CREATE TRIGGER test_fault BEFORE INSERT OR UPDATE ON pgrec.{table} "
                     "FOR EACH ROW EXECUTE FUNCTION pgrec.test_fault()")
    calls = [("PUT", "/v1/users/u1", api.write, {"properties": {"a": 1}}),
             ("POST", "/v1/admin/policies", api.admin,
              {"name": "f1", "kind": "freshness", "params": {"max_age_days": 30}}),
             ("POST", "/v1/recommendations", api.read, {"user_id": "u1", "k": 2})]
    for n, (method, path, headers, body) in enumerate(calls):
        rid = f"fault-{n}"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pgrec.api"):
            r = api.client.request(method, path, json=body, headers={**headers, "X-Request-ID": rid})
        assert r.status_code == 500, (path, r.text)
        assert r.json() == {"detail": "internal error", "request_id": rid}
        errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert errors and all(getattr(rec, "request_id", None) == rid for rec in errors), path
        assert any(getattr(rec, "sqlstate", None) == sqlstate for rec in errors), path


def test_caller_errors_from_sql_stay_4xx(api: Api) -> None:
    _seed(api)
    c = api.client
    # 22023 from pgrec.set_item_embedding (wrong dimension) and P0002 (unknown item)
    r = c.put("/v1/items/a1/embedding", json={"vector": [1.0, 2.0]}, headers=api.write)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "vector"], r.text
    assert c.put("/v1/items/zz/embedding", json={"vector": [1.0] * 16}, headers=api.write).status_code == 404
    assert c.get("/v1/items/zz/similar", headers=api.read).status_code == 404


# ---------------------------------------------------------------- 422s name the field


def test_recommendation_errors_name_the_request_field(api: Api) -> None:
    _seed(api)
    c = api.client
    r = c.post("/v1/recommendations", json={"user_id": "u1", "surface": "nowhere"}, headers=api.read)
    assert r.status_code == 422, r.text
    [d] = r.json()["detail"]
    assert d["loc"] == ["body", "surface"] and "nowhere" in d["msg"] and "pgrec." not in d["msg"], r.text
    for bad, loc in (({"exclude": "a1"}, ["body", "context", "exclude"]),
                     ({"include_only": [1, 2]}, ["body", "context", "include_only"]),
                     ({"params": [1]}, ["body", "context", "params"]),
                     ({"debug": "x"}, ["body", "context", "debug"])):
        r = c.post("/v1/recommendations", json={"user_id": "u1", "context": bad}, headers=api.read)
        assert r.status_code == 422, (bad, r.text)
        [d] = r.json()["detail"]
        assert d["loc"] == loc and "pgrec." not in d["msg"], (bad, r.text)


def test_policy_with_an_unknown_surface_names_it(api: Api) -> None:
    r = api.client.post("/v1/admin/policies", headers=api.admin,
                        json={"name": "f1", "kind": "freshness", "params": {"max_age_days": 30},
                              "surface": "nosurface"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", "surface"], "msg": "unknown surface 'nosurface'",
                                   "type": "value_error"}]
    assert api.db.scalar("SELECT count(*) FROM pgrec.policies WHERE name = 'f1'") == 0


def test_a_path_that_is_not_utf8_is_refused_not_rewritten(api: Api) -> None:
    """Starlette decodes bytes that are not UTF-8 to U+FFFD, so /items/%FF and /items/%FE were one item."""
    for raw in ("%FF", "%ED%A0%80"):
        r = api.client.put(f"/v1/items/{raw}", json={}, headers=api.write)
        assert r.status_code == 422 and "not valid UTF-8" in r.text, r.text
    assert api.db.scalar("SELECT count(*) FROM pgrec.items") == 0
    assert api.client.put("/v1/items/%C3%A9t%C3%A9", json={}, headers=api.write).status_code == 200  # été
    assert api.db.scalar("SELECT item_id FROM pgrec.items") == "été"


def test_probes_answer_on_the_event_loop_and_auth_errors_are_counted(api: Api) -> None:
    """/health, /ready and /metrics must not wait for a request thread (every one can be stuck on a database that
    is gone: a liveness probe then timed out and an orchestrator would restart every copy)."""
    import asyncio

    from engine.api.routes import health

    for fn in (health.health, health.ready, health.prometheus):
        assert asyncio.iscoroutinefunction(fn), fn.__name__
    assert api.client.get("/ready").status_code == 200
    # a stalled database: the readiness query waits on a lock. Each probe answers 503 within its limit and gives
    # its connection back, so requests that do not need the locked table still get theirs
    import time

    from fastapi.testclient import TestClient

    from engine.api import ServiceConfig, create_app

    settings = api.db.settings.model_copy(update={"pool_max_size": 2, "pool_timeout_s": 3.0})
    other = api.db.connect()
    with TestClient(create_app(settings, ServiceConfig(key_cache_ttl_s=60.0))) as client:
        assert client.get("/v1/items/nope", headers=api.read).status_code == 404  # the key is cached
        try:
            other.execute("BEGIN")
            other.execute("LOCK TABLE pgrec.alembic_version IN ACCESS EXCLUSIVE MODE")
            for _ in range(3):  # more probes than pooled connections
                t0 = time.monotonic()
                r = client.get("/ready")
                assert r.status_code == 503 and time.monotonic() - t0 < health.READY_TIMEOUT_S + 1.5, r.text
            t0 = time.monotonic()
            assert client.get("/v1/items/nope", headers=api.read).status_code == 404
            assert time.monotonic() - t0 < 1.5
        finally:
            other.rollback()
            other.close()
        assert client.get("/ready").status_code == 200

    def auth_errors() -> float:
        text = api.client.get("/metrics").text
        line = [x for x in text.splitlines() if x.startswith('pgrec_errors_total{kind="auth"}')]
        return float(line[0].split()[-1]) if line else 0.0

    before = auth_errors()
    assert api.client.post("/v1/recommendations", json={"user_id": "u1"}).status_code == 401
    assert api.client.post("/v1/events", json={}, headers=api.read).status_code == 403
    assert auth_errors() == before + 2


def test_ids_with_a_slash_are_reachable(api: Api) -> None:
    """Imports take ids holding "/"; the routes did not (404 for PUT/GET /v1/items/a%2Fb)."""
    from conftest import TEST_DIM

    c = api.client
    assert c.put("/v1/items/shoes%2Frun-1", json={"categories": ["x"]}, headers=api.write).json()["id"] == "shoes/run-1"
    assert c.put("/v1/items/shoes/run-2", json={"categories": ["x"]}, headers=api.write).status_code == 200
    assert c.get("/v1/items/shoes%2Frun-1", headers=api.read).json()["item_id"] == "shoes/run-1"
    for item in ("shoes/run-1", "shoes/run-2"):
        r = c.put(f"/v1/items/{item}/embedding", json={"vector": [0.1 * (n + 1) for n in range(TEST_DIM)]},
                  headers=api.write)
        assert r.status_code == 204, r.text
    r = c.get("/v1/items/shoes/run-1/similar", params={"k": 5}, headers=api.read)
    assert r.status_code == 200 and [x["item_id"] for x in r.json()] == ["shoes/run-2"], r.text
    assert c.put("/v1/users/team%2Falice", json={"properties": {"country": "de"}}, headers=api.write).status_code == 200
    assert api.db.scalar("SELECT user_id FROM pgrec.users") == "team/alice"
    assert c.get("/v1/items/shoes/none", headers=api.read).status_code == 404
