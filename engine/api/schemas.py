"""Request and response bodies (pydantic): the OpenAPI spec is generated from these."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

# no control characters (PostgreSQL text cannot hold NUL), no leading / trailing blanks
ID_PATTERN = r"^[^\x00-\x20](?:[^\x00-\x1f]*[^\x00-\x20])?$"
Id = Annotated[str, Field(min_length=1, max_length=256, pattern=ID_PATTERN)]
Text = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00]+$")]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]
EventTypeName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

_FUTURE_SLACK = timedelta(days=1)


def _utc(v: datetime) -> datetime:
    """A time as UTC (naive = UTC). PostgreSQL takes offsets up to 15:59 only, Python up to 23:59: an offset
    such as +16:22 reached the database and failed there."""
    if v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    try:
        return v.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once moved to UTC") from None


UtcTime = Annotated[datetime, AfterValidator(_utc)]


class Strict(BaseModel):
    """A request body: unknown fields and non-finite numbers (NaN, Infinity, 1e400) are 422s."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------- events


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class EventIn(Strict):
    event_id: Id | None = Field(None, description="Client id; a repeated (user, event_id) is a duplicate.")
    user_id: Id
    item_id: Id
    event_type: EventTypeName = Field(description="One of pgrec.event_types (view, click, like, ...).")
    occurred_at: UtcTime | None = Field(None, description="ISO 8601; naive times are UTC; default now.")
    value: FiniteFloat | None = Field(None, ge=-1e12, le=1e12, description="e.g. a rating")
    properties: dict[str, Any] | None = None
    request_id: UUID | None = Field(None, description="The recommendation request that led to this event.")

    @field_validator("occurred_at")
    @classmethod
    def _not_future(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return v
        if v > datetime.now(UTC) + _FUTURE_SLACK:
            raise ValueError("is in the future")
        if v < _EPOCH:  # as the imports and pgrec.track_event: every month of events is a partition
            raise ValueError("is before 1970-01-01")
        return v

    @field_validator("properties")
    @classmethod
    def _finite(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json(v)
        return v


class EventBatch(Strict):
    events: list[EventIn] = Field(min_length=1, max_length=1000)


class EventAck(BaseModel):
    status: Literal["stored", "duplicate"]


class BatchAck(BaseModel):
    received: int
    stored: int
    duplicates: int


# ---------------------------------------------------------------- catalog


class ItemIn(Strict):
    categories: list[Text] | None = Field(None, max_length=1000)
    properties: dict[str, Any] | None = None
    created_at: UtcTime | None = None
    available: bool | None = None

    @field_validator("properties")
    @classmethod
    def _finite(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json(v)
        return v



class UserIn(Strict):
    properties: dict[str, Any] | None = None

    @field_validator("properties")
    @classmethod
    def _finite(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json(v)
        return v


class Upserted(BaseModel):
    id: str
    key: int


class EmbeddingIn(Strict):
    vector: list[FiniteFloat] = Field(min_length=1, max_length=2000)
    model_version: Text = "imported"


# ---------------------------------------------------------------- recommendations


class RecommendRequest(Strict):
    user_id: Id
    k: int = Field(10, ge=1, le=200)
    surface: Name = "default"
    context: dict[str, Any] | None = Field(
        None, description="Request-time filters for the policies (exclude / include-only lists, filter values).")
    exclude_seen: bool = Field(
        False, description="Also leave out every item the user already had an event with (whatever the policies say).")

    @field_validator("context")
    @classmethod
    def _finite(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json(v)
        return v


class ScoredItemOut(BaseModel):
    item_id: str
    score: float


class RecommendedItemOut(BaseModel):
    item_id: str
    score: float
    position: int
    reasons: dict[str, Any]


class RecommendationOut(BaseModel):
    request_id: UUID | None = Field(description="What events cite; null when the request was not logged")
    user_id: str
    surface: str
    items: list[RecommendedItemOut]
    model_version: int | None
    variant: str | None
    dropped: dict[str, int]
    skipped: dict[str, str] = Field(default_factory=dict,
                                    description="Policies in force that did not run, with why (a missing request parameter, "
                                                "a holdout)")
    timings_ms: dict[str, float]


# ---------------------------------------------------------------- admin


class VariantIn(Strict):
    name: Name
    share: float = Field(gt=0, le=1)
    model_version: int | None = Field(None, ge=1, le=2**62)
    policy_set: Text | None = None


class ExperimentIn(Strict):
    name: Name
    surface: Name = "default"
    description: Annotated[str, Field(max_length=1000, pattern=r"^[^\x00]*$")] | None = None
    variants: list[VariantIn] = Field(min_length=1, max_length=20)


class ExperimentOut(BaseModel):
    name: str
    surface: str
    active: bool
    description: str | None
    variants: list[VariantIn]


class ReportRow(BaseModel):
    surface: str
    experiment: str = Field(description="the experiment running on the surface when the impressions were served; "
                                        "empty outside any")
    variant: str
    position: int | None = Field(description="NULL: all positions of this surface and variant")
    impressions: int
    clicks: int
    conversions: int
    ctr: float
    conversion_rate: float


class ContributionOut(BaseModel):
    name: str
    value: float | None = Field(description="the feature's value (NULL: missing)")
    contribution: float


class ExplanationOut(BaseModel):
    request_id: str
    user_id: str
    item_id: str
    position: int
    sources: list[str] = Field(description="the candidate sources that found it")
    as_of: datetime | None = Field(description="the time its features describe (the serving time, or a citing "
                                               "event's stamped just before it when they were recomputed)")
    served_score: float | None = Field(description="the score it was served with (after policies)")
    model_version: int
    score: float = Field(description="the ranker's score: base plus the contributions")
    base: float
    stored_features: bool = Field(description="true: the feature row the list was ranked with, stored when it "
                                              "was served; false: recomputed as of as_of")
    contributions: list[ContributionOut] = Field(description="largest absolute contribution first")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    schema_revision: str | None = None
    expected_revision: str | None = None
    detail: str | None = None


def check_json(v: Any, depth: int = 0, where: str = "") -> None:
    """JSON for jsonb: finite numbers and no NUL characters (PostgreSQL rejects \\u0000 in jsonb and has no NaN
    or Infinity in it); the message names the offending key (``size.age``, ``tags[2]``)."""
    at = f" at {where}" if where else ""
    if depth > 32:
        raise ValueError("is nested too deeply")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"contains a non-finite number{at}")
    if isinstance(v, str) and "\x00" in v:
        raise ValueError(f"contains a NUL character{at}")
    if isinstance(v, dict):
        for k, x in v.items():
            if "\x00" in k:
                raise ValueError(f"contains a NUL character{at}")
            check_json(x, depth + 1, f"{where}.{k}" if where else str(k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            check_json(x, depth + 1, f"{where}[{i}]")
