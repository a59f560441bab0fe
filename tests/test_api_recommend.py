"""Recommendations, similar items and trending through the HTTP service and the real facade; A/B variants
reach the facade and are logged with each impression; policy and model administration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine import datasets, experiments

if TYPE_CHECKING:
    from api_support import Api

pytest_plugins = ("api_support",)


def _world(api: Api) -> datasets.Synthetic:
    data = datasets.generate(datasets.GeneratorConfig(users=60, items=150, events=2500, days=30, dim=16, seed=4))
    data.load(api.db.conn)
    return data


def test_recommendations_variants_impressions_and_report(api: Api) -> None:
    data = _world(api)
    c, h = api.client, api.admin
    blocked = data.items[0]["categories"][0]
    r = c.post("/v1/admin/policies", headers=h, json={
        "name": "strict-block", "kind": "blocklist", "params": {"categories": [blocked]}, "policy_set": "strict"})
    assert r.status_code == 201, r.text
    r = c.post("/v1/admin/experiments", headers=h, json={
        "name": "block-test", "surface": "default",
        "variants": [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5, "policy_set": "strict"}]})
    assert r.status_code == 201
    exp = experiments.list_experiments(api.db.conn)[0]
    item_categories = {it["item_id"]: set(it["categories"]) for it in data.items}

    seen_variants = set()
    first_request = None
    for u in data.users[:16]:
        uid = u["user_id"]
        r = c.post("/v1/recommendations", json={"user_id": uid, "k": 8}, headers=api.read)
        assert r.status_code == 200, r.text
        body = r.json()
        expected = experiments.pick(uid, exp)
        assert expected is not None and body["variant"] == expected.name
        assert [i["position"] for i in body["items"]] == list(range(1, len(body["items"]) + 1))
        assert len(body["items"]) == 8 and "total" in body["timings_ms"]
        if body["variant"] == "treatment":
            assert all(blocked not in item_categories[i["item_id"]] for i in body["items"])
        again = c.post("/v1/recommendations", json={"user_id": uid, "k": 8}, headers=api.read).json()
        assert again["variant"] == body["variant"]  # stable
        logged = api.db.conn.execute(
            "SELECT DISTINCT variant, count(*) OVER () FROM pgrec.impressions WHERE request_id = %s",
            (body["request_id"],)).fetchall()
        assert logged == [(body["variant"], 8)]
        seen_variants.add(body["variant"])
        first_request = first_request or body
    assert seen_variants == {"control", "treatment"}

    # a click citing the request id shows in the online report of that variant and position
    assert first_request is not None
    clicked = first_request["items"][2]["item_id"]
    r = c.post("/v1/events", headers=api.write, json={
        "user_id": first_request["user_id"], "item_id": clicked, "event_type": "click",
        "request_id": first_request["request_id"]})
    assert r.status_code == 200
    rows = c.get("/v1/admin/report/online", headers=h, params={"surface": "default"}).json()
    by = {(x["variant"], x["position"]): x for x in rows}
    assert by[(first_request["variant"], 3)]["clicks"] >= 1
    assert sum(x["impressions"] for x in rows if x["position"] is None) == 16 * 2 * 8

    metrics = c.get("/metrics").text
    assert 'pgrec_recommendations_total{surface="default",variant="treatment"}' in metrics
    assert 'pgrec_stage_duration_seconds_count{stage="total"}' in metrics
    assert "pgrec_candidates_total{source=" in metrics


def test_recommendation_errors(api: Api) -> None:
    _world(api)
    c = api.client
    r = c.post("/v1/recommendations", json={"user_id": "u-new", "k": 5}, headers=api.read)
    assert r.status_code == 200 and r.json()["variant"] is None  # cold user, no experiment
    for bad in ({"user_id": "u1", "k": 0}, {"user_id": "u1", "k": 10_000}, {"k": 5},
                {"user_id": "u1", "surface": "Bad Surface"}, {"user_id": "u1", "context": [1]}):
        r = c.post("/v1/recommendations", json=bad, headers=api.read)
        assert r.status_code == 422, (bad, r.text)
    r = c.post("/v1/recommendations", json={"user_id": "u1", "surface": "nowhere"}, headers=api.read)
    assert 400 <= r.status_code < 500, r.text


def test_recommendations_can_leave_out_seen_items(api: Api) -> None:
    _world(api)
    c = api.client
    uid = api.db.scalar("SELECT u.user_id FROM pgrec.events e JOIN pgrec.users u USING (user_key) "
                        "GROUP BY u.user_id ORDER BY count(*) DESC, u.user_id LIMIT 1")
    seen = {r[0] for r in api.db.conn.execute(
        "SELECT i.item_id FROM pgrec.events e JOIN pgrec.items i USING (item_key) JOIN pgrec.users u "
        "USING (user_key) WHERE u.user_id = %s", (uid,)).fetchall()}
    plain = c.post("/v1/recommendations", json={"user_id": uid, "k": 20}, headers=api.read).json()
    clean = c.post("/v1/recommendations", json={"user_id": uid, "k": 20, "exclude_seen": True},
                   headers=api.read).json()
    assert seen & {i["item_id"] for i in plain["items"]}, "the heaviest user's list holds no seen item"
    assert len(clean["items"]) == 20 and not seen & {i["item_id"] for i in clean["items"]}
    bad = c.post("/v1/recommendations", json={"user_id": uid, "exclude_seen": "maybe"}, headers=api.read)
    assert bad.status_code == 422


def test_similar_and_trending(api: Api) -> None:
    data = _world(api)
    c = api.client
    item = data.items[5]["item_id"]
    r = c.get(f"/v1/items/{item}/similar", params={"k": 5}, headers=api.read)
    assert r.status_code == 200 and 0 < len(r.json()) <= 5 and item not in [x["item_id"] for x in r.json()]
    assert c.get("/v1/items/no-such-item/similar", headers=api.read).status_code == 404
    assert c.get(f"/v1/items/{item}/similar", params={"k": 0}, headers=api.read).status_code == 422
    r = c.get("/v1/trending", params={"k": 7}, headers=api.read)
    assert r.status_code == 200 and len(r.json()) == 7
    scores = [x["score"] for x in r.json()]
    assert scores == sorted(scores, reverse=True)
    country = data.users[0]["properties"]["country"]
    r = c.get("/v1/trending", params={"k": 5, "segment": country}, headers=api.read)
    assert r.status_code == 200 and len(r.json()) == 5


def test_policy_and_model_administration(api: Api) -> None:
    c, h = api.client, api.admin
    r = c.post("/v1/admin/policies", headers=h, json={"name": "b1", "kind": "boost",
                                                      "params": {"predicate": {"field": "categories", "op": "in",
                                                                               "values": ["x"]}, "multiply": -2}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "params"], r.text
    r = c.post("/v1/admin/policies", headers=h, json={"name": "b1", "kind": "teleport"})
    assert r.status_code == 422
    r = c.post("/v1/admin/policies", headers=h, json={"name": "fresh", "kind": "freshness",
                                                      "params": {"max_age_days": 30}})
    assert r.status_code == 201 and r.json()["version"] == 1 and r.json()["created_by"].startswith("api-key:")
    r = c.patch("/v1/admin/policies/fresh", headers=h, json={"params": {"max_age_days": 10}, "enabled": False})
    assert r.status_code == 200 and r.json()["params"] == {"max_age_days": 10} and r.json()["enabled"] is False
    assert "fresh" in [p["name"] for p in c.get("/v1/admin/policies", headers=h).json()]
    assert len(c.get("/v1/admin/policies/fresh/history", headers=h).json()) >= 2
    assert c.get("/v1/admin/policies/nope", headers=h).status_code == 404
    assert c.get("/v1/admin/policies", headers=api.read).status_code == 403
    assert c.delete("/v1/admin/policies/fresh", headers=h).status_code == 204
    assert c.delete("/v1/admin/policies/fresh", headers=h).status_code == 404
    assert c.put("/v1/admin/item-sets/promo", headers=h, json={"items": ["a", "b", "a"]}).json() == ["a", "b"]
    assert c.get("/v1/admin/item-sets", headers=h).json() == {"promo": ["a", "b"]}
    assert c.delete("/v1/admin/item-sets/promo", headers=h).status_code == 204
    assert c.delete("/v1/admin/item-sets/promo", headers=h).status_code == 404

    assert c.get("/v1/admin/models", headers=h).json() == []
    assert c.get("/v1/admin/models/42", headers=h).status_code == 404
    assert c.post("/v1/admin/models/42/activate", headers=h).status_code == 404
    assert c.post("/v1/admin/models/rollback", headers=h).status_code == 422
    # two real (tiny) rankers: activation compiles the model to SQL, so the artifact must be a LightGBM dump
    import lightgbm as lgb
    import numpy as np

    x = np.random.default_rng(0).random((60, 2))
    for rounds in (2, 3):
        booster = lgb.train({"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                            lgb.Dataset(x, x[:, 0], feature_name=["f_a", "f_b"]), num_boost_round=rounds)
        api.db.conn.execute("INSERT INTO pgrec.models (kind, artifact, features) VALUES ('ranker', %s, %s)",
                            (booster.model_to_string().encode(), '["f_a", "f_b"]'))
    junk = api.db.scalar("INSERT INTO pgrec.models (kind, artifact) VALUES ('ranker', 'x') RETURNING version")
    assert c.post(f"/v1/admin/models/{junk}/activate", headers=h).status_code == 422
    assert c.post("/v1/admin/models/1/activate", headers=h).json()["active"] is True
    assert c.post("/v1/admin/models/2/activate", headers=h).json()["active"] is True
    assert c.post("/v1/admin/models/rollback", headers=h).json()["version"] == 1
    assert [m["version"] for m in c.get("/v1/admin/models", headers=h).json() if m["active"]] == [1]


def test_explanation_of_a_served_item(api: Api) -> None:
    import uuid

    import lightgbm as lgb
    import numpy as np

    from engine.ranking import features, registry

    data = _world(api)
    c, h = api.client, api.admin
    uid = data.users[0]["user_id"]
    # no ranker: the list was ranked by pgrec.fallback_score, nothing to explain
    body = c.post("/v1/recommendations", json={"user_id": uid, "k": 5}, headers=api.read).json()
    url = f"/v1/admin/requests/{body['request_id']}/items/{body['items'][0]['item_id']}/explanation"
    r = c.get(url, headers=h)
    assert r.status_code == 422 and "without a ranker" in r.text, r.text
    names = features.current_names(api.db.conn)
    rng = np.random.default_rng(3)
    booster = lgb.train({"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 2},
                        lgb.Dataset(rng.random((80, len(names))), rng.random(80), feature_name=names),
                        num_boost_round=5)
    version = registry.save(api.db.conn, kind="ranker", artifact=booster.model_to_string().encode(), params={},
                            features=names, metrics={}, data_window={}, activate=True)
    body = c.post("/v1/recommendations", json={"user_id": uid, "k": 5}, headers=api.read).json()
    item = body["items"][1]
    url = f"/v1/admin/requests/{body['request_id']}/items/{item['item_id']}/explanation"
    r = c.get(url, headers=h)
    assert r.status_code == 200, r.text
    ex = r.json()
    assert ex["position"] == 2 and ex["model_version"] == version and ex["stored_features"] is True
    assert ex["user_id"] == uid and {x["name"] for x in ex["contributions"]} == set(names)
    assert ex["sources"] and ex["as_of"] is not None   # the sources that found it; the time of its features
    assert abs(ex["base"] + sum(x["contribution"] for x in ex["contributions"]) - ex["score"]) < 1e-9
    assert abs(ex["score"] - item["score"]) < 1e-9   # no boost here: served with the ranker's score
    assert c.get(url, headers=api.read).status_code == 403
    assert c.get(f"/v1/admin/requests/{uuid.uuid4()}/items/{item['item_id']}/explanation", headers=h).status_code == 404
    assert c.get(f"/v1/admin/requests/not-a-uuid/items/{item['item_id']}/explanation", headers=h).status_code == 422
