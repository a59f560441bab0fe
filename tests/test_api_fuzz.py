"""A schema-driven fuzz over the OpenAPI spec (schemathesis + hypothesis): no input gets a 5xx.

Every operation is called with generated (valid and invalid) path, query, header and body values, with an
admin key (so the requests reach the handlers) against a small real database. Bounded: at most
``EXAMPLES`` cases per operation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from api_support import Api

pytest_plugins = ("api_support",)

EXAMPLES = 15


def _seed(api: Api) -> None:
    c, h = api.client, api.write
    for i in ("a1", "a2", "a3"):
        assert c.put(f"/v1/items/{i}", json={"categories": ["x"]}, headers=h).status_code == 200
        assert c.put(f"/v1/items/{i}/embedding", json={"vector": [1.0] + [0.1 * len(i)] * 15},
                     headers=h).status_code == 204
    assert c.post("/v1/events", json={"user_id": "u1", "item_id": "a1", "event_type": "click"},
                  headers=h).status_code == 200


def test_no_input_gets_a_5xx(api: Api) -> None:
    _seed(api)
    schema = schemathesis.openapi.from_dict(api.client.get("/openapi.json").json())
    failures: list[str] = []
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 12

    for operation in operations:
        strategy = operation.as_strategy()

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, auth=st.sampled_from(["admin", "admin", "admin", "read", "none"]))
        def call(case: Any, auth: str) -> None:
            headers = {} if auth == "none" else dict(getattr(api, auth))
            kw = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
            request: dict[str, Any] = {"method": kw["method"], "url": kw["url"], "headers": kw.get("headers"),
                                       "params": kw.get("params")}
            if "json" in kw:
                request["json"] = kw["json"]
            elif kw.get("data") is not None:
                request["content"] = kw["data"]
            r = api.client.request(**request)
            if r.status_code >= 500:
                failures.append(f"{kw['method']} {kw['url']} {kw.get('params')} {str(kw.get('json'))[:200]} "
                                f"-> {r.status_code} {r.text[:200]}")
            assert "Traceback" not in r.text

        call()
    assert failures == [], "\n".join(failures[:20])
