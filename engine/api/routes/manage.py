"""Policy and model administration (scope admin), through engine.policies and engine.ranking.registry."""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Path, Query
from pydantic import Field, field_validator

from engine import policies
from engine.api.deps import AdminKey, Conn
from engine.api.keys import ApiKey
from engine.api.schemas import Name, Strict, Text, UtcTime, check_json
from engine.errors import InvalidRequest
from engine.ranking import registry

router = APIRouter(prefix="/v1/admin", tags=["admin"])

Ref = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="policy name or id")]
SetName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
Version = Annotated[int, Path(ge=1, le=2**62)]


class PolicyIn(Strict):
    name: Name
    kind: Annotated[str, Field(pattern=r"^[a-z_]{1,40}$", description=", ".join(policies.KINDS))]
    params: dict[str, Any] = Field(default_factory=dict)
    surface: Name | None = None
    segment: dict[str, Any] | None = None
    priority: int = Field(100, ge=-1_000_000, le=1_000_000)
    enabled: bool = True
    starts_at: UtcTime | None = None
    ends_at: UtcTime | None = None
    policy_set: Name | None = None
    description: Annotated[str, Field(max_length=1000, pattern=r"^[^\x00]*$")] | None = None

    @field_validator("params", "segment")
    @classmethod
    def _json(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json(v)
        return v


class PolicyPatch(Strict):
    params: dict[str, Any] | None = None
    priority: int | None = Field(None, ge=-1_000_000, le=1_000_000)
    enabled: bool | None = None

    @field_validator("params")
    @classmethod
    def _json(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json(v)
        return v


# the registry's and the policy module's dataclasses are the response models (FastAPI serialises dataclasses)
PolicyOut = policies.Policy
ModelOut = registry.ModelInfo


class ItemSetIn(Strict):
    items: list[Text] = Field(max_length=100_000)
    description: Annotated[str, Field(max_length=1000, pattern=r"^[^\x00]*$")] | None = None


def _actor(key: ApiKey) -> str:
    return f"api-key:{key.key_id}:{key.name}"[:200]


def _policy(p: policies.Policy) -> PolicyOut:
    return p


_CALLER_DB_ERRORS = (psycopg.errors.CheckViolation, psycopg.errors.UniqueViolation,
                     psycopg.errors.InvalidParameterValue)


def _params_error(kind: str, exc: InvalidRequest) -> Exception:
    """``boost: params.multiply: ...`` -> ``params.multiply: ...`` so the 422 names the field.

    engine.policies turns every database error into an InvalidRequest; but for the ones it words well (checks,
    duplicates, 22023), the database error itself goes to errors.database_error: an unknown reference becomes
    a 422 naming the field and value (``surface: unknown surface 'x'``), a fault that is not the caller's a 500."""
    cause = exc.__context__
    if isinstance(cause, psycopg.Error) and not isinstance(cause, _CALLER_DB_ERRORS):
        return cause
    return InvalidRequest(str(exc).removeprefix(f"{kind}: "))


# ---------------------------------------------------------------- policies


@router.get("/policies", response_model=list[PolicyOut], summary="Policies in application order")
def list_policies(key: AdminKey, conn: Conn,
                  surface: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")] = None,
                  include_disabled: bool = True) -> list[PolicyOut]:
    return [_policy(p) for p in policies.list_(conn, surface=surface, include_disabled=include_disabled)]


@router.post("/policies", response_model=PolicyOut, status_code=201, summary="Add a re-ranking policy")
def add_policy(body: PolicyIn, key: AdminKey, conn: Conn) -> PolicyOut:
    try:
        return _policy(policies.add(
            conn, body.name, body.kind, body.params, surface=body.surface, segment=body.segment,
            priority=body.priority, enabled=body.enabled, starts_at=body.starts_at, ends_at=body.ends_at,
            policy_set=body.policy_set, description=body.description, actor=_actor(key)))
    except InvalidRequest as exc:
        raise _params_error(body.kind, exc) from None


@router.get("/policies/{ref}", response_model=PolicyOut, responses={404: {"description": "unknown policy"}},
            summary="One policy by name or id")
def get_policy(ref: Ref, key: AdminKey, conn: Conn) -> PolicyOut:
    return _policy(policies.get(conn, ref))


@router.patch("/policies/{ref}", response_model=PolicyOut, responses={404: {"description": "unknown policy"}},
              summary="Change a policy's parameters, priority or enabled flag (a new version)")
def patch_policy(ref: Ref, body: PolicyPatch, key: AdminKey, conn: Conn) -> PolicyOut:
    pol = policies.get(conn, ref)
    try:
        if body.params is not None or body.priority is not None:
            pol = policies.update(conn, ref, params=body.params, priority=body.priority, actor=_actor(key))
        if body.enabled is not None:
            pol = policies.set_enabled(conn, ref, body.enabled, actor=_actor(key))
    except InvalidRequest as exc:
        raise _params_error(pol.kind, exc) from None
    return _policy(pol)


@router.delete("/policies/{ref}", status_code=204, responses={404: {"description": "unknown policy"}},
               summary="Delete a policy (its versions stay in the audit log)")
def delete_policy(ref: Ref, key: AdminKey, conn: Conn) -> None:
    policies.delete(conn, ref)


@router.get("/policies/{ref}/history", response_model=list[dict[str, Any]],
            responses={404: {"description": "unknown policy"}}, summary="Every version of a policy")
def policy_history(ref: Ref, key: AdminKey, conn: Conn) -> list[dict[str, Any]]:
    return policies.history(conn, ref)


@router.get("/item-sets", response_model=dict[str, list[str]], summary="Named item sets (for blocklists, pins)")
def list_item_sets(key: AdminKey, conn: Conn) -> dict[str, list[str]]:
    return policies.item_sets(conn)


@router.put("/item-sets/{name}", response_model=list[str], summary="Create or replace an item set")
def put_item_set(name: SetName, body: ItemSetIn, key: AdminKey, conn: Conn) -> list[str]:
    return policies.put_item_set(conn, name, body.items, description=body.description, actor=_actor(key))


@router.delete("/item-sets/{name}", status_code=204, responses={404: {"description": "unknown item set"}},
               summary="Delete an item set (refused while a policy uses it)")
def delete_item_set(name: SetName, key: AdminKey, conn: Conn) -> None:
    policies.delete_item_set(conn, name)


# ---------------------------------------------------------------- models


@router.get("/models", response_model=list[ModelOut], summary="The model registry, newest first")
def list_models(key: AdminKey, conn: Conn,
                kind: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,62}$")] = None) -> list[ModelOut]:
    return [m for m in registry.list_models(conn, kind)]


@router.get("/models/{version}", response_model=ModelOut, responses={404: {"description": "unknown version"}},
            summary="One model (without its artifact)")
def get_model(version: Version, key: AdminKey, conn: Conn) -> ModelOut:
    return registry.get(conn, version)[0]


@router.post("/models/{version}/activate", response_model=ModelOut,
             responses={404: {"description": "unknown version"}},
             summary="Make a model the active one of its kind (serving picks it up on the next request)")
def activate_model(version: Version, key: AdminKey, conn: Conn) -> ModelOut:
    return registry.activate(conn, version)


@router.post("/models/rollback", response_model=ModelOut,
             summary="Re-activate the model that was active before the current one")
def rollback_model(key: AdminKey, conn: Conn,
                   kind: Annotated[str, Query(pattern=r"^[a-z][a-z0-9_]{0,62}$")] = registry.RANKER) -> ModelOut:
    return registry.rollback(conn, kind)
