"""Event intake: one event or a batch; idempotent by (user, event_id); answered only after commit."""

from __future__ import annotations

import json
from typing import Any

import psycopg
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from engine import ingest
from engine.api import metrics
from engine.api.deps import Conn, WriteKey
from engine.api.schemas import BatchAck, EventAck, EventBatch, EventIn
from engine.errors import InvalidRequest, NotFound
from engine.sql import query

router = APIRouter(prefix="/v1", tags=["events"])

_FIELDS = ("event type", "event_type"), ("occurred_at", "occurred_at"), ("value", "value"), ("properties", "properties")


@router.post("/events", response_model=EventAck, responses={404: {"description": "unknown item"}},
             summary="Record one event (users are created on first sight; the item must exist)")
def track(event: EventIn, key: WriteKey, conn: Conn) -> EventAck:
    try:
        row = conn.execute(query("service.track_event"), {
            "user_id": event.user_id, "item_id": event.item_id, "event_type": event.event_type,
            "occurred_at": event.occurred_at, "value": event.value, "event_id": event.event_id,
            "properties": None if event.properties is None else json.dumps(event.properties),
            "request_id": event.request_id,
        }).fetchone()
    except psycopg.errors.NoDataFound as exc:
        raise NotFound(f"item_id: unknown item {event.item_id!r}") from exc
    except psycopg.errors.InvalidParameterValue as exc:
        message = exc.diag.message_primary or str(exc)
        field = next((f for word, f in _FIELDS if word in message), "event")
        raise InvalidRequest(f"{field}: {message.removeprefix('pgrec.track_event: ')}") from None
    assert row is not None
    metrics.EVENTS.labels(row[0]).inc()
    return EventAck(status=row[0])


@router.post("/events/batch", response_model=BatchAck,
             responses={404: {"description": "an unknown item (nothing stored)"}},
             summary="Record up to 1000 events in one transaction: all or nothing, duplicates skipped")
def track_batch(batch: EventBatch, key: WriteKey, conn: Conn) -> BatchAck | JSONResponse:
    records = ((n, _raw(e)) for n, e in enumerate(batch.events, start=1))
    try:
        result = ingest.import_records(conn, "events", records, source="request")
    except ingest.ImportFailed as exc:
        unknown_items = [r for r in exc.rejects if r.field == "item_id" and r.reason.startswith("unknown item")]
        if len(unknown_items) == len(exc.rejects):
            first = unknown_items[0]
            raise NotFound(f"events[{first.line - 1}].item_id: {first.reason.split(' (')[0]}"
                           f"{f' (and {len(exc.rejects) - 1} more)' if len(exc.rejects) > 1 else ''}; "
                           "nothing stored") from None
        return JSONResponse({"detail": [{"loc": ["body", "events", r.line - 1, r.field], "msg": r.reason,
                                         "type": "value_error"} for r in exc.rejects[:100]]}, status_code=422)
    metrics.EVENTS.labels("stored").inc(result.stored)
    metrics.EVENTS.labels("duplicate").inc(result.duplicates)
    return BatchAck(received=result.read, stored=result.stored, duplicates=result.duplicates)


def _raw(e: EventIn) -> dict[str, Any]:
    raw = e.model_dump()
    if raw["occurred_at"] is None:
        from datetime import UTC, datetime

        raw["occurred_at"] = datetime.now(UTC)
    if raw["request_id"] is not None:
        raw["request_id"] = str(raw["request_id"])
    return raw
