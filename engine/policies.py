"""Stage 3: re-ranking with business rules stored as rows of ``pgrec.policies``.

The rules run in one place, the SQL function ``pgrec.rerank`` (sql/policies/v2.sql + v3.sql), so the Python,
SQL-only and HTTP paths serve the same lists; this module writes the rows and calls that function.

A policy row: ``name``, ``kind``, ``params`` (checked per kind by the database when written, and by the models
below first), ``surface`` (None = every surface), ``segment`` (a predicate on user properties, None = everyone),
``priority`` (lower runs first; ties by kind in the order of ``KINDS``), ``enabled``, ``starts_at``/``ends_at``
(active in ``[starts_at, ends_at)`` relative to the request's ``as_of``), ``policy_set`` (None = in every set; an
A/B variant chooses a set), ``version`` (grows on every change) and audit columns.

Predicates are JSON, never SQL: ``{"all": [...]}``, ``{"any": [...]}``, ``{"not": p}`` or a condition
``{"property": "brand", "op": "equals", "value": "acme"}`` / ``{"field": "categories", "op": "in", "values": [...]}``.
Fields: ``categories``, ``item_id``, ``source``, ``score``, ``age_days``; ops: ``equals``, ``in``, ``range``
(``min``/``max``, inclusive), ``contains``, ``exists``. A value may be ``{"param": "max_age_rating", "default": 18}``:
read from the request's ``context["params"]``; a policy whose parameter is missing (and has no default) is skipped.

Kinds and parameters (also in docs/policies.md):

=================== ============================================================================================
holdout             percent (0-100], salt = "", control = "trending" | "scores": a stable share of users (hash of
                    the user key and salt) gets the control list; later policies other than content filters
                    are skipped
exclude_interacted  event_types = all, lookback_days = all time: items the user had such events with
exclude_negative    lookback_days, neighbours = false, min_similarity = 0.9, max_dislikes = 20: items the user
                    disliked, and with neighbours the items close to one of the latest dislikes (seeded, on)
exclude_served      min_impressions, window_days, engagement_types = positive events: impression fatigue
blocklist           items, item_sets, categories (at least one): never shown
freshness           max_age_days: items created longer ago are dropped
attribute_filter    predicate, mode = "keep" | "drop"
relevance_floor     min_score, fill = "none" | "trending": drop items under the floor, fill a short list
boost               predicate, multiply >= 0, add: score * multiply + add for matching items (< 1 buries;
                    a negative score is divided by multiply, so > 1 always raises; 0 sets it to add,
                    which raises any score below add; multiply is 0 or at least 1e-6)
source_mix          source, min_share, max_share: share of the top k found by a candidate source
diversity           max_per_value, property = categories, window, top = k, depth = 100: at most M per value in
                    the top, or in any window of w positions
mmr                 lambda in [0, 1], pool = max(3k, 30): maximal marginal relevance over item embeddings
promote             predicate, share: at least ceil(share * k) matching items in the top k
exploration         eligible = fresh (max_age_days) | under_exposed (max_impressions, window_days = 7) |
                    predicate (predicate), slots = 1, positions = last slots, depth = 100
pin                 items | item_set, positions = 1, 2, ...: items at fixed positions
=================== ============================================================================================

Always applied, before any policy: unknown and unavailable items are dropped, and the request's
``context["exclude"]`` / ``context["include_only"]`` lists of item ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import InvalidRequest, NotFound
from engine.sql import query

KINDS: tuple[str, ...] = (
    "holdout", "exclude_interacted", "exclude_negative", "exclude_served", "blocklist", "freshness",
    "attribute_filter", "relevance_floor", "boost", "source_mix", "diversity", "mmr", "promote", "exploration", "pin",
)

Predicate = dict[str, Any]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HoldoutParams(_Params):
    percent: float = Field(gt=0, le=100, description="share of users (by a stable hash) in the holdout")
    salt: str = Field(default="", description="change it to draw a different holdout")
    control: Literal["trending", "scores"] = Field(default="trending", description="the list holdout users get")


# upper bounds the database checks too (sql/policies/v3.sql policy_validate): beyond them applying a policy overflowed
MAX_DAYS = 36500
MAX_IMPRESSIONS = 1_000_000
MAX_SCORE = 1e12


class ExcludeInteractedParams(_Params):
    event_types: list[str] | None = Field(default=None, description="event type names; None = every type")
    lookback_days: float | None = Field(default=None, gt=0, le=MAX_DAYS, description="None = all time")


class ExcludeNegativeParams(_Params):
    lookback_days: float | None = Field(default=None, gt=0, le=MAX_DAYS)
    neighbours: bool = Field(default=False, description="also drop items close to a recent dislike")
    min_similarity: float = Field(default=0.9, gt=0, le=1, description="cosine similarity of a close neighbour")
    max_dislikes: int = Field(default=20, ge=1, le=1000, description="how many of the latest dislikes")


class ExcludeServedParams(_Params):
    min_impressions: int = Field(ge=1, le=MAX_IMPRESSIONS, description="shown in at least this many requests")
    window_days: float = Field(gt=0, le=MAX_DAYS)
    engagement_types: list[str] | None = Field(default=None, description="None = any positive event")


class BlocklistParams(_Params):
    items: list[str] = Field(default_factory=list)
    item_sets: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something(self) -> BlocklistParams:
        if not (self.items or self.item_sets or self.categories):
            raise ValueError("a blocklist needs items, item_sets or categories")
        return self


class FreshnessParams(_Params):
    max_age_days: float = Field(gt=0, le=MAX_DAYS)


class AttributeFilterParams(_Params):
    predicate: Predicate
    mode: Literal["keep", "drop"] = "keep"


class RelevanceFloorParams(_Params):
    min_score: float = Field(ge=-MAX_SCORE, le=MAX_SCORE)
    fill: Literal["none", "trending"] = "none"


class BoostParams(_Params):
    predicate: Predicate
    multiply: float | None = Field(default=None, ge=0, le=1e6)

    @field_validator("multiply")
    @classmethod
    def _zero_or_not_tiny(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < 1e-6:
            raise ValueError(f"must be 0 or at least 1e-6, got {v}")
        return v
    add: float | None = Field(default=None, ge=-MAX_SCORE, le=MAX_SCORE)

    @model_validator(mode="after")
    def _something(self) -> BoostParams:
        if self.multiply is None and self.add is None:
            raise ValueError('a boost needs "multiply", "add" or both')
        return self


class SourceMixParams(_Params):
    source: str = Field(min_length=1)   # a label of the list's sources (pgrec's: ann, history, trending, ...)
    min_share: float | None = Field(default=None, ge=0, le=1)
    max_share: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _something(self) -> SourceMixParams:
        if self.min_share is None and self.max_share is None:
            raise ValueError('a source mix needs "min_share", "max_share" or both')
        if self.min_share is not None and self.max_share is not None and self.min_share > self.max_share:
            raise ValueError("min_share must not exceed max_share")
        return self


class DiversityParams(_Params):
    max_per_value: int = Field(ge=1, le=1000)
    property: str | None = Field(default=None, min_length=1, description="None = the item's categories")
    window: int | None = Field(default=None, ge=2, le=1000, description="None = the whole top")
    top: int | None = Field(default=None, ge=1, le=1000, description="None = k")
    depth: int | None = Field(default=None, ge=1, le=5000, description="how far down to look (default 100)")


class MmrParams(_Params):
    lambda_: float = Field(alias="lambda", ge=0, le=1, description="1 = relevance only, 0 = diversity only")
    pool: int | None = Field(default=None, ge=2, le=1000, description="default max(3k, 30)")


class PromoteParams(_Params):
    predicate: Predicate
    share: float = Field(gt=0, le=1)


class ExplorationParams(_Params):
    eligible: Literal["fresh", "under_exposed", "predicate"]
    max_age_days: float | None = Field(default=None, gt=0, le=MAX_DAYS)
    max_impressions: int | None = Field(default=None, ge=1, le=MAX_IMPRESSIONS)
    window_days: float | None = Field(default=None, gt=0, le=MAX_DAYS)
    predicate: Predicate | None = None
    slots: int | None = Field(default=None, ge=1, le=100)
    positions: list[Annotated[int, Field(ge=1, le=1000)]] | None = None
    depth: int | None = Field(default=None, ge=1, le=5000)

    @model_validator(mode="after")
    def _something(self) -> ExplorationParams:
        need = {"fresh": "max_age_days", "under_exposed": "max_impressions", "predicate": "predicate"}[self.eligible]
        if getattr(self, need) is None:
            raise ValueError(f"eligible={self.eligible} needs {need}")
        return self


class PinParams(_Params):
    items: list[str] | None = None
    item_set: str | None = None
    positions: list[Annotated[int, Field(ge=1, le=1000)]] | None = None

    @model_validator(mode="after")
    def _something(self) -> PinParams:
        if (self.items is None) == (self.item_set is None):
            raise ValueError('a pin names exactly one of "items" or "item_set"')
        if self.items is not None and self.positions is not None and len(self.items) > len(self.positions):
            raise ValueError(f"positions: has {len(self.positions)} positions for {len(self.items)} items "
                             "(item i goes to position i)")
        return self


PARAMS: dict[str, type[_Params]] = {
    "holdout": HoldoutParams, "exclude_interacted": ExcludeInteractedParams,
    "exclude_negative": ExcludeNegativeParams, "exclude_served": ExcludeServedParams, "blocklist": BlocklistParams,
    "freshness": FreshnessParams, "attribute_filter": AttributeFilterParams, "relevance_floor": RelevanceFloorParams,
    "boost": BoostParams, "source_mix": SourceMixParams, "diversity": DiversityParams, "mmr": MmrParams,
    "promote": PromoteParams, "exploration": ExplorationParams, "pin": PinParams,
}


def check_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters of ``kind`` as they will be stored (only the keys given); InvalidRequest names the field.

    The database checks them again (and predicates in full) when the row is written."""
    if kind not in PARAMS:
        raise InvalidRequest(f"unknown policy kind {kind!r} (known: {', '.join(KINDS)})")
    try:
        PARAMS[kind].model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(["params", *(str(p) for p in err["loc"])])
        raise InvalidRequest(f"{kind}: {where}: {err['msg']}") from None
    return params


# ---------------------------------------------------------------- rows


@dataclass
class Policy:
    """One row of ``pgrec.policies``."""

    policy_id: int
    name: str
    kind: str
    params: dict[str, Any]
    surface: str | None
    segment: dict[str, Any] | None
    priority: int
    enabled: bool
    starts_at: datetime | None
    ends_at: datetime | None
    policy_set: str | None
    description: str | None
    version: int
    created_at: datetime
    created_by: str
    updated_at: datetime
    updated_by: str

    @property
    def label(self) -> str:
        """How ``pgrec.rerank`` names the policy in dropped counts and reasons."""
        return f"{self.policy_id}/{self.kind}"


_CHECKS = {
    "policies_name_check": "name: lowercase letters, digits, '_', '.', '-' (at most 63, starting with a letter or digit)",
    "policies_policy_set_check": "policy_set: lowercase letters, digits, '_', '.', '-' (at most 63)",
    "policies_window": "starts_at must be before ends_at",
    "item_sets_name_check": "item set name: lowercase letters, digits, '_', '.', '-' (at most 63)",
}


def _db_error(exc: psycopg.Error) -> InvalidRequest:
    msg = exc.diag.message_primary or str(exc)
    if isinstance(exc, psycopg.errors.CheckViolation):
        return InvalidRequest(_CHECKS.get(exc.diag.constraint_name or "", msg))
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return InvalidRequest(f"already exists: {exc.diag.message_detail or msg}")
    if isinstance(exc, psycopg.errors.ForeignKeyViolation):
        return InvalidRequest(f"unknown surface: {exc.diag.message_detail or msg}")
    return InvalidRequest(msg)


def add(conn: psycopg.Connection[Any], name: str, kind: str, params: dict[str, Any] | None = None, *,
        surface: str | None = None, segment: Predicate | None = None, priority: int = 100, enabled: bool = True,
        starts_at: datetime | None = None, ends_at: datetime | None = None, policy_set: str | None = None,
        description: str | None = None, actor: str | None = None) -> Policy:
    """Write a new policy; InvalidRequest (naming the field) when a parameter is malformed."""
    params = check_params(kind, params or {})
    try:
        with conn.transaction():
            row = conn.execute(query("policies.insert_policy"), {
                "name": name, "kind": kind, "params": Jsonb(params), "surface": surface,
                "segment": Jsonb(segment) if segment is not None else None, "priority": priority,
                "enabled": enabled, "starts_at": starts_at, "ends_at": ends_at, "policy_set": policy_set,
                "description": description, "actor": actor,
            }).fetchone()
    except psycopg.Error as exc:
        raise _db_error(exc) from None
    assert row is not None
    return get(conn, str(row[0]))


def list_(conn: psycopg.Connection[Any], *, surface: str | None = None, include_disabled: bool = True) -> list[Policy]:
    """The policies in application order (priority, kind, id); with ``surface``, those that apply to it."""
    rows = conn.execute(query("policies.list_policies"), {"surface": surface, "all": include_disabled}).fetchall()
    return [Policy(*r) for r in rows]


def get(conn: psycopg.Connection[Any], ref: str) -> Policy:
    """A policy by name or id; NotFound otherwise."""
    row = conn.execute(query("policies.get_policy"), {"ref": str(ref)}).fetchone()
    if row is None:
        raise NotFound(f"no policy named or numbered {ref!r}")
    return Policy(*row)


def set_enabled(conn: psycopg.Connection[Any], ref: str, enabled: bool, *, actor: str | None = None) -> Policy:
    """Enable or disable a policy (a new version when it changes)."""
    pol = get(conn, ref)
    conn.execute(query("policies.set_enabled"), {"policy_id": pol.policy_id, "enabled": enabled, "actor": actor})
    return get(conn, str(pol.policy_id))


def update(conn: psycopg.Connection[Any], ref: str, *, params: dict[str, Any] | None = None,
           priority: int | None = None, actor: str | None = None) -> Policy:
    """Change a policy's parameters or priority (validated like a new row)."""
    pol = get(conn, ref)
    if params is not None:
        check_params(pol.kind, params)
    try:
        with conn.transaction():
            conn.execute(query("policies.update_policy"), {
                "policy_id": pol.policy_id, "params": Jsonb(params) if params is not None else None,
                "priority": priority, "actor": actor})
    except psycopg.Error as exc:
        raise _db_error(exc) from None
    return get(conn, str(pol.policy_id))


def delete(conn: psycopg.Connection[Any], ref: str) -> None:
    """Delete a policy (its versions stay in pgrec.policy_audit)."""
    conn.execute(query("policies.delete_policy"), {"policy_id": get(conn, ref).policy_id})


def history(conn: psycopg.Connection[Any], ref: str) -> list[dict[str, Any]]:
    """Every version of a policy from the audit log, oldest first."""
    rows = conn.execute(query("policies.policy_history"), {"policy_id": get(conn, ref).policy_id}).fetchall()
    return [{"version": r[0], "action": r[1], "row": r[2], "changed_at": r[3], "changed_by": r[4]} for r in rows]


def put_item_set(conn: psycopg.Connection[Any], name: str, items: list[str], *, description: str | None = None,
                 actor: str | None = None) -> list[str]:
    """Create or replace a named item set; returns its items (deduplicated, in order)."""
    try:
        with conn.transaction():
            row = conn.execute(query("policies.put_item_set"), {
                "name": name, "items": list(items), "description": description, "actor": actor}).fetchone()
    except psycopg.Error as exc:
        raise _db_error(exc) from None
    assert row is not None
    return list(row[1])


def item_sets(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Every item set by name."""
    return {r[0]: list(r[1]) for r in conn.execute(query("policies.list_item_sets")).fetchall()}


def delete_item_set(conn: psycopg.Connection[Any], name: str) -> None:
    """Delete an item set; InvalidRequest while a policy refers to it."""
    users = [r[0] for r in conn.execute(query("policies.item_set_users"), {"name": name}).fetchall()]
    if users:
        raise InvalidRequest(f"item set {name!r} is used by policies {', '.join(users)}")
    if conn.execute(query("policies.delete_item_set"), {"name": name}).rowcount == 0:
        raise NotFound(f"no item set named {name!r}")


# ---------------------------------------------------------------- rerank


@dataclass
class RerankedItem:
    item_key: int
    item_id: str
    score: float | None
    position: int
    reasons: dict[str, Any]


@dataclass
class Reranked:
    """What ``pgrec.rerank`` returned: the top k, the drops per policy, the versions that ran."""

    items: list[RerankedItem]
    dropped: dict[str, int]
    policy_versions: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    holdout: bool = False
    steps: list[dict[str, Any]] | None = None

    @property
    def item_ids(self) -> list[str]:
        return [it.item_id for it in self.items]


def parse(result: dict[str, Any]) -> Reranked:
    """The JSON of ``pgrec.rerank`` as objects."""
    return Reranked(
        items=[RerankedItem(i["item_key"], i["item_id"], i["score"], i["position"], i["reasons"])
               for i in result["items"]],
        dropped=dict(result["dropped"]), policy_versions=list(result["policy_versions"]),
        skipped=dict(result.get("skipped") or {}), holdout=bool(result.get("holdout")), steps=result.get("steps"),
    )


def rerank(conn: psycopg.Connection[Any], user_key: int | None, surface: str, k: int, item_keys: list[int],
           scores: list[float], sources: list[str] | None = None, *, context: dict[str, Any] | None = None,
           as_of: datetime | None = None, policy_set: str | None = None) -> Reranked:
    """Apply the policies in force to a scored list (the SQL function ``pgrec.rerank``, the one engine)."""
    try:
        row = conn.execute(query("policies.rerank"), {
            "user_key": user_key, "surface": surface, "k": k, "item_keys": list(item_keys),
            "scores": list(scores), "sources": list(sources) if sources is not None else None,
            "context": Jsonb(context or {}), "as_of": as_of, "policy_set": policy_set,
        }).fetchone()
    except psycopg.errors.InvalidParameterValue as exc:
        raise InvalidRequest(exc.diag.message_primary or str(exc)) from None
    assert row is not None
    result = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    return parse(result)


def explain(conn: psycopg.Connection[Any], user_id: str, surface: str = "default", *, k: int = 10,
            as_of: datetime | None = None, context: dict[str, Any] | None = None, policy_set: str | None = None,
            show: int | None = None) -> Reranked:
    """Re-rank the user's candidates, scored as the Python path serves them (the active ranker, or
    ``pgrec.fallback_score`` without one), with the per-policy snapshots (``steps``: the first ``show`` items after
    each policy). Nothing is logged."""
    from engine.pipeline import scored_candidates

    if context is not None and not isinstance(context, dict):
        raise InvalidRequest("context must be a JSON object")
    row = conn.execute(query("policies.user_key"), {"user_id": user_id}).fetchone()
    keys, scores, sources, _ = scored_candidates(conn, user_id, surface, as_of)
    ctx = dict(context or {})
    excl = ctx.get("exclude")
    if ctx.pop("exclude_seen", False) is True and row is not None and isinstance(excl, list | None):
        # as pgrec.finish_request does for a request (a malformed exclude is left for pgrec.rerank to refuse)
        seen = [r[0] for r in conn.execute(query("policies.seen_item_ids"), {"user_key": row[0], "as_of": as_of})]
        ctx["exclude"] = [*(excl or []), *seen]
    ctx["debug"] = show or k
    return rerank(conn, row[0] if row else None, surface, k, keys, list(scores), sources,
                  context=ctx, as_of=as_of, policy_set=policy_set)
