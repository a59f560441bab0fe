"""The HTTP service through TestClient against the real database: keys and scopes, intake, catalog, admin."""

from __future__ import annotations

import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import TestDB
from fastapi.testclient import TestClient

from engine import experiments, policies
from engine.api import ServiceConfig, create_app
from engine.api.keys import create_key, hash_token, list_keys, revoke_key
from engine.api.logs import JsonFormatter
from engine.config import Settings
from engine.errors import NotFound

if TYPE_CHECKING:
    from api_support import Api

pytest_plugins = ("api_support",)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _item(api: Api, item_id: str, **body: object) -> None:
    r = api.client.put(f"/v1/items/{item_id}", json=body, headers=api.write)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- health, docs, metrics


def test_health_ready_docs_metrics(api: Api) -> None:
    assert api.client.get("/health").json() == {"status": "ok"}
    ready = api.client.get("/ready")
    assert ready.status_code == 200
    newest = sorted(p.name.split("_")[0] for p in (Path(__file__).parents[1] / "migrations" / "versions").glob("0*.py"))[-1]
    assert ready.json()["schema_revision"] == ready.json()["expected_revision"] == newest
    spec = api.client.get("/openapi.json").json()
    assert "/v1/recommendations" in spec["paths"] and "/v1/events/batch" in spec["paths"]
    assert api.client.get("/docs").status_code == 200
    metrics = api.client.get("/metrics").text
    assert 'pgrec_http_requests_total{endpoint="/ready",method="GET",status="200"}' in metrics


def test_ready_reports_schema_behind(api: Api) -> None:
    api.db.conn.execute("UPDATE pgrec.alembic_version SET version_num = '0006'")
    r = api.client.get("/ready")
    assert r.status_code == 503
    assert r.json()["status"] == "schema_mismatch" and r.json()["schema_revision"] == "0006"


# ---------------------------------------------------------------- keys and scopes


def test_keys_are_stored_hashed_and_scoped(api: Api) -> None:
    token, info = create_key(api.db.conn, "ops", ["admin", "read"])
    assert info.scopes == ["read", "admin"] and token.startswith(info.prefix)
    stored = api.db.conn.execute("SELECT key_hash, prefix FROM pgrec.api_keys WHERE key_id = %s",
                                 (info.key_id,)).fetchone()
    assert stored == (hash_token(token), token[:12])
    assert api.db.scalar("SELECT count(*) FROM pgrec.api_keys WHERE key_hash = %s OR prefix = %s",
                         (token, token)) == 0
    with pytest.raises(ValueError, match="scopes"):
        create_key(api.db.conn, "bad", ["root"])


def test_missing_invalid_and_wrong_scope_keys(api: Api) -> None:
    c = api.client
    r = c.get("/v1/items/x")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/items/x", headers=bearer("pgr_nope")).status_code == 401
    assert c.get("/v1/items/x", headers={"Authorization": "Basic abc"}).status_code == 401
    assert c.put("/v1/items/x", json={}, headers=api.read).status_code == 403
    assert c.get("/v1/items/x", headers=api.write).status_code == 403
    assert c.get("/v1/admin/experiments", headers=api.write).status_code == 403
    assert c.put("/v1/items/x", json={}, headers=api.admin).status_code == 200  # admin may do everything
    assert c.get("/v1/items/x", headers=api.read).status_code == 200


def test_revoked_key_is_refused(api: Api) -> None:
    token, info = create_key(api.db.conn, "temp", ["read"])
    assert api.client.get("/v1/items/zz", headers=bearer(token)).status_code == 404
    revoke_key(api.db.conn, info.key_id)
    assert api.client.get("/v1/items/zz", headers=bearer(token)).status_code == 401
    assert [k.key_id for k in list_keys(api.db.conn) if k.key_id == info.key_id] == []
    assert [k.revoked_at is not None for k in list_keys(api.db.conn, include_revoked=True)
            if k.key_id == info.key_id] == [True]
    with pytest.raises(NotFound, match="already revoked"):
        revoke_key(api.db.conn, info.key_id)
    with pytest.raises(NotFound, match="no key"):
        revoke_key(api.db.conn, 99999)


# ---------------------------------------------------------------- events


def test_single_event_is_committed_before_the_answer_and_idempotent(api: Api) -> None:
    _item(api, "a1")
    rid = str(uuid.uuid4())
    ev = {"event_id": "e1", "user_id": "u1", "item_id": "a1", "event_type": "click", "request_id": rid,
          "properties": {"device": "phone"}}
    r = api.client.post("/v1/events", json=ev, headers=api.write)
    assert r.status_code == 200 and r.json() == {"status": "stored"}
    # a different connection sees it as soon as the answer is back
    row = api.db.conn.execute("SELECT request_id::text, properties FROM pgrec.events").fetchall()
    assert row == [(rid, {"device": "phone"})]
    assert api.client.post("/v1/events", json=ev, headers=api.write).json() == {"status": "duplicate"}
    assert api.db.scalar("SELECT count(*) FROM pgrec.events") == 1


def test_an_event_decades_old_is_taken_and_the_user_still_served(api: Api) -> None:
    """The same past times as the imports and pgrec.track_event (from 1970 on), and a user whose events lie
    decades apart is served (the recency weight of the old one no longer underflows)."""
    for i in range(5):
        _item(api, f"a{i}")
    for i, at in enumerate(["1971-06-01T00:00:00Z", "2003-01-01T00:00:00Z", datetime.now(UTC).isoformat()]):
        ev = {"user_id": "old", "item_id": f"a{i}", "event_type": "like", "occurred_at": at}
        r = api.client.post("/v1/events", json=ev, headers=api.write)
        assert r.status_code == 200 and r.json() == {"status": "stored"}, r.text
    r = api.client.post("/v1/recommendations", json={"user_id": "old", "k": 2}, headers=api.read)
    assert r.status_code == 200, r.text
    assert len(r.json()["items"]) == 2


def test_times_with_offsets_postgresql_lacks_are_moved_to_utc(api: Api) -> None:
    """Python takes UTC offsets up to 23:59, PostgreSQL up to 15:59: the service hands the database UTC (a
    fuzzed batch with +16:22 reached the database and came back as a 500)."""
    _item(api, "a1")
    ev = {"user_id": "tz", "item_id": "a1", "event_type": "view", "occurred_at": "1990-10-22T23:26:30+16:22"}
    r = api.client.post("/v1/events/batch", json={"events": [ev]}, headers=api.write)
    assert r.status_code == 200, r.text
    assert api.db.scalar("SELECT occurred_at AT TIME ZONE 'UTC' FROM pgrec.events e JOIN pgrec.users u "
                         "USING (user_key) WHERE u.user_id = 'tz'").isoformat() == "1990-10-22T07:04:30"
    r = api.client.put("/v1/items/a2", json={"created_at": "2020-01-01T00:00:00-17:30"}, headers=api.write)
    assert r.status_code in (200, 201), r.text
    for before, why in (("0001-01-01T00:00:00+01:00", "out of range once moved to UTC"),
                        ("1970-01-01T00:30:00+01:00", "before 1970-01-01")):
        ev["occurred_at"] = before
        r = api.client.post("/v1/events", json=ev, headers=api.write)
        assert r.status_code == 422 and "occurred_at" in r.text and why in r.text, r.text


BAD_EVENTS: list[tuple[dict[str, object], int, str | None]] = [
    ({"item_id": "nope"}, 404, None),
    ({"event_type": "teleport"}, 422, "event_type"),
    ({"event_type": "Bad Type"}, 422, "event_type"),
    ({"user_id": ""}, 422, "user_id"),
    ({"user_id": None}, 422, "user_id"),
    ({"occurred_at": (datetime.now(UTC) + timedelta(days=3)).isoformat()}, 422, "occurred_at"),
    ({"occurred_at": "yesterday"}, 422, "occurred_at"),
    ({"request_id": "not-a-uuid"}, 422, "request_id"),
    ({"properties": [1, 2]}, 422, "properties"),
    ({"value": "x"}, 422, "value"),
    ({"colour": "red"}, 422, "colour"),
]


def test_bad_events_are_refused_naming_the_field(api: Api) -> None:
    _item(api, "a1")
    for patch, status, field in BAD_EVENTS:
        ev = {"user_id": "u1", "item_id": "a1", "event_type": "view", **patch}
        r = api.client.post("/v1/events", json=ev, headers=api.write)
        assert r.status_code == status, (patch, r.text)
        if field:
            assert field in {str(p) for d in r.json()["detail"] for p in d["loc"]}, (patch, r.text)
        else:
            assert "nope" in r.json()["detail"]
    assert api.db.scalar("SELECT count(*) FROM pgrec.events") == 0


def test_event_batches_are_idempotent_and_all_or_nothing(api: Api) -> None:
    for i in ("a1", "a2"):
        _item(api, i)
    t = datetime(2026, 1, 5, tzinfo=UTC).isoformat()
    batch = {"events": [
        {"event_id": "b1", "user_id": "u1", "item_id": "a1", "event_type": "view", "occurred_at": t},
        {"event_id": "b2", "user_id": "u1", "item_id": "a2", "event_type": "click", "occurred_at": t},
        {"event_id": "b3", "user_id": "u2", "item_id": "a2", "event_type": "rating", "value": 5, "occurred_at": t},
    ]}
    first = api.client.post("/v1/events/batch", json=batch, headers=api.write)
    assert first.status_code == 200 and first.json() == {"received": 3, "stored": 3, "duplicates": 0}
    again = api.client.post("/v1/events/batch", json=batch, headers=api.write)
    assert again.json() == {"received": 3, "stored": 0, "duplicates": 3}
    assert api.db.scalar("SELECT count(*) FROM pgrec.events") == 3

    unknown = {"events": [*batch["events"], {"event_id": "b4", "user_id": "u3", "item_id": "zz",
                                             "event_type": "view", "occurred_at": t}]}
    r = api.client.post("/v1/events/batch", json=unknown, headers=api.write)
    assert r.status_code == 404 and "events[3].item_id" in r.json()["detail"]
    bad = {"events": [{"event_id": "b5", "user_id": "u4", "item_id": "a1", "event_type": "view",
                       "occurred_at": t}, {"user_id": "u4", "item_id": "a1", "event_type": "teleport"}]}
    r = api.client.post("/v1/events/batch", json=bad, headers=api.write)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "events", 1, "event_type"]
    assert api.db.scalar("SELECT count(*) FROM pgrec.events") == 3
    assert api.db.scalar("SELECT count(*) FROM pgrec.users WHERE user_id IN ('u3', 'u4')") == 0
    too_many = {"events": [{"user_id": "u", "item_id": "a1", "event_type": "view"}] * 1001}
    assert api.client.post("/v1/events/batch", json=too_many, headers=api.write).status_code == 422
    assert api.client.post("/v1/events/batch", json={"events": []}, headers=api.write).status_code == 422


# ---------------------------------------------------------------- catalog


def test_item_user_and_embedding_upserts(api: Api) -> None:
    c = api.client
    r = c.put("/v1/items/m1", json={"categories": ["drama"], "properties": {"lang": "fr"}}, headers=api.write)
    assert r.status_code == 200 and r.json()["id"] == "m1"
    c.put("/v1/items/m1", json={"available": False}, headers=api.write)
    got = c.get("/v1/items/m1", headers=api.read).json()
    assert (got["categories"], got["properties"], got["available"], got["has_embedding"]) == (
        ["drama"], {"lang": "fr"}, False, False)
    assert c.get("/v1/items/m2", headers=api.read).status_code == 404

    vec = [0.1] * 16
    assert c.put("/v1/items/m1/embedding", json={"vector": vec}, headers=api.write).status_code == 204
    assert c.get("/v1/items/m1", headers=api.read).json()["has_embedding"] is True
    r = c.put("/v1/items/m1/embedding", json={"vector": [0.1] * 3}, headers=api.write)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "vector"]
    assert "3 dimensions, expected 16" in r.json()["detail"][0]["msg"]
    assert c.put("/v1/items/m1/embedding", json={"vector": [0.0] * 16}, headers=api.write).status_code == 422
    assert c.put("/v1/items/m9/embedding", json={"vector": vec}, headers=api.write).status_code == 404

    r = c.put("/v1/users/u1", json={"properties": {"country": "de"}}, headers=api.write)
    assert r.status_code == 200
    assert api.db.scalar("SELECT properties->>'country' FROM pgrec.users WHERE user_id = 'u1'") == "de"
    assert c.put("/v1/users/u1", json={"properties": "de"}, headers=api.write).status_code == 422
    assert c.put("/v1/users/%20u1", json={}, headers=api.write).status_code == 422


def test_body_limit_and_malformed_json(api: Api) -> None:
    big = {"properties": {"blob": "x" * 70_000}}
    r = api.client.put("/v1/items/big", json=big, headers=api.write)
    assert r.status_code == 413
    # no content-length: the streamed body is counted
    r = api.client.put("/v1/items/big", content=iter([b'{"properties": {"b": "', b"x" * 70_000, b'"}}']),
                       headers={**api.write, "content-type": "application/json"})
    assert r.status_code == 413
    r = api.client.put("/v1/items/big", content=b"{not json", headers={**api.write, "content-type": "application/json"})
    assert r.status_code == 422
    assert api.db.scalar("SELECT count(*) FROM pgrec.items") == 0


def test_database_outage_is_503_not_a_hang(api: Api) -> None:
    token = api.admin["Authorization"]
    down = Settings(database_url="postgresql://pgrec@127.0.0.1:9/nowhere", embedding_dim=16, pool_timeout_s=0.5)
    with TestClient(create_app(down)) as client:
        t0 = time.monotonic()
        assert client.get("/ready").status_code == 503
        r = client.post("/v1/events", json={"user_id": "u", "item_id": "i", "event_type": "view"},
                        headers={"Authorization": token})
        assert r.status_code == 503 and r.json() == {"detail": "the database is unavailable; try again"}
        assert client.get("/health").status_code == 200
        assert time.monotonic() - t0 < 10


def test_statement_timeout_is_503(api: Api) -> None:
    settings = api.db.settings.model_copy(update={"statement_timeout_ms": 50})
    api.db.conn.execute("SELECT pgrec.upsert_item('a1')")
    locker = api.db.connect(autocommit=False)
    try:
        locker.execute("LOCK TABLE pgrec.items IN ACCESS EXCLUSIVE MODE")
        with TestClient(create_app(settings)) as client:
            r = client.get("/v1/items/a1", headers=api.read)
            assert r.status_code == 503
    finally:
        locker.rollback()
        locker.close()


# ---------------------------------------------------------------- logs


def test_json_logs_carry_the_request_id(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pgrec.api"):
        r = api.client.get("/v1/items/none", headers={**api.read, "X-Request-ID": "trace-123"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "trace-123"
    records = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "trace-123"]
    assert records
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "trace-123" and line["status"] == 404 and line["endpoint"] == "/v1/items/{item_id}"
    assert "Traceback" not in r.text
    generated = api.client.get("/health").headers["x-request-id"]
    assert len(generated) == 32


# ---------------------------------------------------------------- experiments and the report


def _experiment(api: Api, name: str = "exp1", shares: tuple[float, float] = (0.5, 0.5)) -> None:
    if api.db.scalar("SELECT count(*) FROM pgrec.policies WHERE policy_set = 'strict'") == 0:
        # a variant's policy set must hold a policy (a misspelt one made the test an A/A test)
        bad = api.client.post("/v1/admin/experiments", headers=api.admin, json={
            "name": name, "surface": "default",
            "variants": [{"name": "control", "share": shares[0]},
                         {"name": "treatment", "share": shares[1], "policy_set": "strict"}]})
        assert bad.status_code == 404 and "no enabled policy of policy set 'strict'" in bad.text, bad.text
        # nor one whose only policy is disabled
        policies.add(api.db.conn, "strict-boost", "boost",
                     {"predicate": {"field": "categories", "op": "exists"}, "multiply": 1.0}, policy_set="strict",
                     enabled=False)
        again = api.client.post("/v1/admin/experiments", headers=api.admin, json={
            "name": name, "surface": "default", "variants": [{"name": "control", "share": shares[0]},
                                                             {"name": "treatment", "share": shares[1],
                                                              "policy_set": "strict"}]})
        assert again.status_code == 404, again.text
        policies.set_enabled(api.db.conn, "strict-boost", True)
    r = api.client.post("/v1/admin/experiments", headers=api.admin, json={
        "name": name, "surface": "default",
        "variants": [{"name": "control", "share": shares[0]},
                     {"name": "treatment", "share": shares[1], "policy_set": "strict"}]})
    assert r.status_code == 201, r.text


def test_variant_assignment_is_stable_and_matches_sql(api: Api) -> None:
    _experiment(api, shares=(0.3, 0.7))
    exps = experiments.list_experiments(api.db.conn)
    assert [(e.name, [v.name for v in e.variants]) for e in exps] == [("exp1", ["control", "treatment"])]
    users = [f"user-{i}" for i in range(300)]
    py = [experiments.pick(u, exps[0]) for u in users]
    assert py == [experiments.pick(u, exps[0]) for u in users]  # stable
    sql = [experiments.assign_sql(api.db.conn, u, "default") for u in users]
    assert py == sql
    share = sum(v is not None and v.name == "treatment" for v in py) / len(users)
    assert 0.6 < share < 0.8
    assert {v.policy_set for v in py if v and v.name == "treatment"} == {"strict"}
    assert experiments.assign_sql(api.db.conn, "user-1", "other") is None
    # another experiment name reshuffles users independently
    other = experiments.Experiment("exp2", "default", exps[0].variants)
    assert [experiments.pick(u, other) for u in users] != py


def test_experiment_admin_validation(api: Api) -> None:
    c, h = api.client, api.admin
    body = {"name": "e1", "variants": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}
    r = c.post("/v1/admin/experiments", json=body, headers=h)
    assert r.status_code == 422 and "sum to 1" in r.json()["detail"][0]["msg"]
    r = c.post("/v1/admin/experiments", json={**body, "surface": "nowhere"}, headers=h)
    assert r.status_code == 404 or r.status_code == 422
    r = c.post("/v1/admin/experiments", headers=h, json={
        "name": "e1", "variants": [{"name": "a", "share": 1.0, "model_version": 424242}]})
    assert r.status_code == 404 and "model_version" in r.json()["detail"]
    _experiment(api, "e2")
    r = c.post("/v1/admin/experiments", headers=h, json={"name": "e3", "variants": [{"name": "a", "share": 1}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "surface"]
    assert c.post("/v1/admin/experiments/e2/end", headers=h).status_code == 204
    assert c.post("/v1/admin/experiments/e2/end", headers=h).status_code == 404
    assert c.post("/v1/admin/experiments/zz/end", headers=h).status_code == 404
    assert [e["name"] for e in c.get("/v1/admin/experiments?include_ended=true", headers=h).json()] == ["e2"]
    assert c.get("/v1/admin/experiments", headers=h).json() == []


def test_an_arm_needs_a_ranker_and_gets_it_compiled_for_sql(api: Api) -> None:
    """A variant naming a retrieval model is refused (its users got 500s: found by review); a ranker stored
    without activation is compiled when the experiment starts, so SQL-only apps can serve that arm too."""
    import lightgbm as lgb
    import numpy as np

    db: TestDB = api.db
    retrieval = db.scalar("INSERT INTO pgrec.models (kind, artifact, features) VALUES ('retrieval', %s, '[]') "
                          "RETURNING version", (b"\x80not a booster",))
    r = api.client.post("/v1/admin/experiments", headers=api.admin, json={
        "name": "e-ret", "surface": "default", "variants": [{"name": "a", "share": 1, "model_version": retrieval}]})
    assert r.status_code == 422
    assert r.json()["detail"] == [{"loc": ["body", "variants", "0", "model_version"], "type": "value_error",
                                   "msg": f"model version {retrieval} is a retrieval model, not a ranker"}]
    x = np.random.default_rng(1).normal(size=(200, 2))
    booster = lgb.train({"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                        lgb.Dataset(x, x[:, 0]), num_boost_round=3)
    ranker = db.scalar("INSERT INTO pgrec.models (kind, artifact, features) VALUES ('ranker', %s, %s) "
                       "RETURNING version", (booster.model_to_string().encode(), json.dumps(["f_a", "f_b"])))
    assert db.scalar("SELECT count(*) FROM pgrec.compiled_rankers WHERE version = %s", (ranker,)) == 0
    r = api.client.post("/v1/admin/experiments", headers=api.admin, json={
        "name": "e-rank", "surface": "default", "variants": [{"name": "a", "share": 1, "model_version": ranker}]})
    assert r.status_code == 201, r.text
    assert db.scalar("SELECT function_name FROM pgrec.compiled_rankers WHERE version = %s", (ranker,)) == \
        f"ranker_score_v{ranker}"
    assert [e.name for e in experiments.list_experiments(db.conn)] == ["e-rank"]


def test_online_report_joins_impressions_with_events(api: Api) -> None:
    db: TestDB = api.db
    for i in ("a", "b"):
        db.conn.execute("SELECT pgrec.upsert_item(%s)", (i,))
    db.conn.execute("SELECT pgrec.upsert_user('u1'), pgrec.upsert_user('u2')")
    served = datetime.now(UTC) - timedelta(days=4)
    r1, r2 = uuid.uuid4(), uuid.uuid4()
    db.conn.execute("""
        INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, variant, served_at)
        SELECT r, u.user_key, 'default', p, i.item_key, v, %(t)s
          FROM (VALUES (%(r1)s::uuid, 'u1', 1, 'a', 'control'), (%(r1)s::uuid, 'u1', 2, 'b', 'control'),
                       (%(r2)s::uuid, 'u2', 1, 'a', 'treatment'), (%(r2)s::uuid, 'u2', 2, 'b', 'treatment'))
               AS x(r, uid, p, iid, v)
          JOIN pgrec.users u ON u.user_id = x.uid JOIN pgrec.items i ON i.item_id = x.iid""",
        {"t": served, "r1": r1, "r2": r2})
    t = served + timedelta(minutes=5)
    # u1 clicks b citing the request, then buys it; u2 clicks a without a request id (window join);
    # u2 clicks b three days later (outside the window: not counted)
    for args in (("u1", "b", "click", t, None, r1), ("u1", "b", "purchase", t, None, r1),
                 ("u2", "a", "click", t, None, None), ("u2", "b", "click", t + timedelta(days=3), None, None)):
        db.conn.execute("SELECT pgrec.track_event(%s, %s, %s, %s, NULL, NULL, NULL, %s)",
                        (args[0], args[1], args[2], args[3], args[5]))
    r = api.client.get("/v1/admin/report/online", headers=api.admin)
    assert r.status_code == 200
    rows = {(x["variant"], x["position"]): x for x in r.json()}
    assert (rows[("control", None)]["impressions"], rows[("control", None)]["clicks"],
            rows[("control", None)]["conversions"]) == (4 // 2, 1, 1)
    assert rows[("control", 2)]["ctr"] == 1.0 and rows[("control", 1)]["clicks"] == 0
    assert (rows[("treatment", 1)]["clicks"], rows[("treatment", 2)]["clicks"]) == (1, 0)
    assert rows[("treatment", None)]["conversion_rate"] == 0.0
    since = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert api.client.get("/v1/admin/report/online", params={"since": since}, headers=api.admin).json() == []
    assert api.client.get("/v1/admin/report/online", params={"surface": "x"}, headers=api.admin).json() == []
    assert api.client.get("/v1/admin/report/online", params={"since": "soon"}, headers=api.admin).status_code == 422


def test_online_report_credits_a_click_once_and_never_before_the_impression(api: Api) -> None:
    """Two cases the review found: a click citing a request id but made before that list was served, and one
    click without a request id after two lists (two variants) showed the item: it counted for both."""
    db: TestDB = api.db
    db.conn.execute("SELECT pgrec.upsert_item('a'), pgrec.upsert_user('u1')")
    served = datetime.now(UTC) - timedelta(days=4)
    rp, rq = uuid.uuid4(), uuid.uuid4()
    db.conn.execute("""
        INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, variant, served_at)
        SELECT x.r, u.user_key, 'default', 1, i.item_key, x.v, x.t
          FROM (VALUES (%(rp)s::uuid, 'P', %(t)s::timestamptz),
                       (%(rq)s::uuid, 'Q', %(t)s::timestamptz + interval '10 minutes')) AS x(r, v, t),
               pgrec.users u, pgrec.items i WHERE u.user_id = 'u1' AND i.item_id = 'a'""",
        {"t": served, "rp": rp, "rq": rq})

    def report() -> dict[str, int]:
        rows = api.client.get("/v1/admin/report/online", headers=api.admin).json()
        return {x["variant"]: x["clicks"] for x in rows if x["position"] is None}

    # a click three days before P was served, citing P's request id: no click
    db.conn.execute("SELECT pgrec.track_event('u1', 'a', 'click', %s, NULL, NULL, NULL, %s)",
                    (served - timedelta(days=3), rp))
    assert report() == {"P": 0, "Q": 0}
    # a purchase citing P, stamped 5 seconds before P by a client whose clock is behind the database's: credited
    db.conn.execute("SELECT pgrec.track_event('u1', 'a', 'purchase', %s, NULL, NULL, NULL, %s)",
                    (served - timedelta(seconds=5), rp))
    rows = api.client.get("/v1/admin/report/online", headers=api.admin).json()
    assert {x["variant"]: x["conversions"] for x in rows if x["position"] is None} == {"P": 1, "Q": 0}
    # one click without a request id after both lists: credited once, to the later list (Q)
    db.conn.execute("SELECT pgrec.track_event('u1', 'a', 'click', %s)", (served + timedelta(minutes=30),))
    assert report() == {"P": 0, "Q": 1}


def test_online_report_keeps_experiments_that_reuse_variant_names_apart(api: Api) -> None:
    db: TestDB = api.db
    db.conn.execute("SELECT pgrec.upsert_item('a'), pgrec.upsert_user('u1')")
    _experiment(api, "first")
    assert api.client.post("/v1/admin/experiments/first/end", headers=api.admin).status_code == 204
    _experiment(api, "second")
    first = db.conn.execute("SELECT created_at, ended_at FROM pgrec.experiments WHERE experiment = 'first'").fetchone()
    second = db.scalar("SELECT created_at FROM pgrec.experiments WHERE experiment = 'second'")
    assert first is not None
    before = first[0] - timedelta(days=1)
    # one impression of 'control' in each experiment, one before either, one without a variant
    for served, variant in ((first[0], "control"), (second, "control"), (before, "control"), (second, None)):
        db.conn.execute(
            "INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, variant, served_at) "
            "SELECT %s, u.user_key, 'default', 1, i.item_key, %s, %s FROM pgrec.users u, pgrec.items i "
            "WHERE u.user_id = 'u1' AND i.item_id = 'a'", (uuid.uuid4(), variant, served))
    rows = api.client.get("/v1/admin/report/online", headers=api.admin).json()
    totals = {(x["experiment"], x["variant"]): x["impressions"] for x in rows if x["position"] is None}
    assert totals == {("", ""): 1, ("", "control"): 1, ("first", "control"): 1, ("second", "control"): 1}


def test_lists_served_with_an_ended_experiments_arm_are_reported_under_it(api: Api) -> None:
    """A service copy's cached experiment can outlive its end by a few seconds: the impressions record the
    experiment of their variant, so the report does not file them under the experiment that started meanwhile."""
    from engine.pipeline import Recommender

    db: TestDB = api.db
    for i in ("a1", "a2", "a3"):
        api.client.put(f"/v1/items/{i}", json={"categories": ["x"]}, headers=api.write)
    _experiment(api, "first")
    stale = experiments.pick("u1", next(e for e in experiments.list_experiments(db.conn) if e.name == "first"))
    assert stale is not None and stale.experiment == "first"
    assert api.client.post("/v1/admin/experiments/first/end", headers=api.admin).status_code == 204
    _experiment(api, "second")
    with Recommender(db.settings) as rec:
        served = rec.recommend("u1", k=2, variant=stale)  # as a copy whose cache still holds "first"
    assert db.scalar("SELECT DISTINCT experiment FROM pgrec.impressions WHERE request_id = %s",
                     (served.request_id,)) == "first"
    rows = api.client.get("/v1/admin/report/online", headers=api.admin).json()
    assert {(x["experiment"], x["variant"]) for x in rows if x["position"] is None} == {("first", stale.name)}
    # the SQL assignment names the experiment too
    assert experiments.assign_sql(db.conn, "u1").experiment == "second"  # type: ignore[union-attr]


def test_more_concurrent_requests_than_threads_and_connections(api: Api) -> None:
    """Requests outnumber both the worker threads and the pooled connections: each still gets its answer (a
    connection held by a request that waits for a thread, and threads waiting for connections, never block each
    other until the pool timeout)."""
    api.client.put("/v1/items/c1", json={"categories": ["x"]}, headers=api.write)
    settings = api.db.settings.model_copy(update={"pool_timeout_s": 2.0, "pool_min_size": 0, "pool_max_size": 2,
                                                  "service_threads": 2})
    app = create_app(settings, ServiceConfig(key_cache_ttl_s=60.0))
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=16) as ex:
        assert client.get("/v1/items/c1", headers=api.read).status_code == 200  # the key is cached
        t0 = time.monotonic()
        codes = list(ex.map(lambda _: client.get("/v1/items/c1", headers=api.read).status_code, range(48)))
        assert codes == [200] * 48
        assert time.monotonic() - t0 < 2.0  # no request waited for the pool timeout
