"""Items, users and item embeddings (upserts: fields left out keep their stored values)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Path
from pydantic import BaseModel

from engine.api.deps import Conn, ReadKey, WriteKey
from engine.api.schemas import ID_PATTERN, EmbeddingIn, ItemIn, Upserted, UserIn
from engine.errors import InvalidRequest, NotFound
from engine.sql import query

router = APIRouter(prefix="/v1", tags=["catalog"])

ItemId = Annotated[str, Path(min_length=1, max_length=256, pattern=ID_PATTERN)]
UserId = Annotated[str, Path(min_length=1, max_length=256, pattern=ID_PATTERN)]


class ItemOut(BaseModel):
    item_id: str
    categories: list[str]
    properties: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    available: bool
    has_embedding: bool


# Ids may hold "/" (imports take them): the path converter takes the rest of the path, so the routes with a
# suffix (/embedding here, /similar in recommend.py, whose router is included first) come before the plain ones
# and an id that itself ends in "/embedding" or "/similar" cannot be written or read over HTTP.
@router.put("/items/{item_id:path}/embedding", status_code=204, responses={404: {"description": "unknown item"}},
            summary="Store an item's vector (checked: dimension, finite values, not all zeros)")
def put_embedding(item_id: ItemId, body: EmbeddingIn, key: WriteKey, conn: Conn) -> None:
    try:
        conn.execute(query("service.set_item_embedding"),
                     {"item_id": item_id, "vector": body.vector, "model_version": body.model_version})
    except psycopg.errors.NoDataFound:
        raise NotFound(f"item_id: unknown item {item_id!r}") from None
    except psycopg.errors.InvalidParameterValue as exc:
        raise InvalidRequest(f"vector: {exc.diag.message_primary or exc}") from None


@router.put("/items/{item_id:path}", response_model=Upserted, summary="Create or update an item")
def put_item(item_id: ItemId, item: ItemIn, key: WriteKey, conn: Conn) -> Upserted:
    row = conn.execute(query("service.upsert_item"), {
        "item_id": item_id, "categories": item.categories,
        "properties": None if item.properties is None else json.dumps(item.properties),
        "created_at": item.created_at, "available": item.available}).fetchone()
    assert row is not None
    return Upserted(id=item_id, key=int(row[0]))


@router.get("/items/{item_id:path}", response_model=ItemOut, responses={404: {"description": "unknown item"}},
            summary="An item as stored")
def get_item(item_id: ItemId, key: ReadKey, conn: Conn) -> ItemOut:
    row = conn.execute(query("service.get_item"), {"item_id": item_id}).fetchone()
    if row is None:
        raise NotFound(f"item_id: unknown item {item_id!r}")
    return ItemOut(item_id=row[0], categories=row[1], properties=row[2], created_at=row[3], updated_at=row[4],
                   available=row[5], has_embedding=row[6])


@router.put("/users/{user_id:path}", response_model=Upserted, summary="Create or update a user (properties)")
def put_user(user_id: UserId, user: UserIn, key: WriteKey, conn: Conn) -> Upserted:
    row = conn.execute(query("service.upsert_user"), {
        "user_id": user_id,
        "properties": None if user.properties is None else json.dumps(user.properties)}).fetchone()
    assert row is not None
    return Upserted(id=user_id, key=int(row[0]))
