"""Recommendations, similar items and trending, through the serving facade (engine.pipeline.Recommender)."""

from __future__ import annotations

import re
from typing import Annotated

import psycopg
from fastapi import APIRouter, Path, Query

from engine.api import metrics
from engine.api.deps import ReadKey, ServicesDep
from engine.api.schemas import (
    ID_PATTERN,
    RecommendationOut,
    RecommendedItemOut,
    RecommendRequest,
    ScoredItemOut,
)
from engine.errors import InvalidRequest

router = APIRouter(prefix="/v1", tags=["recommendations"])


@router.post("/recommendations", response_model=RecommendationOut,
             summary="Top k items for a user on a surface; logged as impressions with the A/B variant")
def recommend(body: RecommendRequest, key: ReadKey, services: ServicesDep) -> RecommendationOut:
    variant = services.assigner.assign(body.user_id, body.surface)
    try:
        rec = services.recommender.recommend(body.user_id, k=body.k, surface=body.surface, context=body.context,
                                             variant=variant, exclude_seen=body.exclude_seen)
    except InvalidRequest as exc:
        cause = exc.__cause__
        if isinstance(cause, psycopg.Error) and cause.sqlstate != "22023":
            # the facade also counts 22P02 / 22007 / 22008 as bad input; the body is validated here, so they are
            # faults: errors.database_error answers 500
            raise cause from None
        raise _name_field(str(exc)) from None
    sources: dict[str, int] = dict(getattr(rec, "candidates", None) or {})
    if not sources:
        for it in rec.items:
            for s in _sources(it.reasons):
                sources[s] = sources.get(s, 0) + 1
    metrics.observe_recommendation(rec.surface, rec.variant, rec.timings_ms, rec.dropped, sources)
    return RecommendationOut(
        request_id=rec.request_id, user_id=rec.user_id, surface=rec.surface, model_version=rec.model_version,
        variant=rec.variant, dropped=dict(rec.dropped), skipped=dict(rec.skipped), timings_ms=dict(rec.timings_ms),
        items=[RecommendedItemOut(item_id=i.item_id, score=float(i.score), position=i.position,
                                  reasons=dict(i.reasons)) for i in rec.items])


@router.get("/items/{item_id:path}/similar", response_model=list[ScoredItemOut],
            responses={404: {"description": "unknown item"}}, summary="Items nearest to an item's vector")
def similar(item_id: Annotated[str, Path(min_length=1, max_length=256, pattern=ID_PATTERN)], key: ReadKey,
            services: ServicesDep, k: Annotated[int, Query(ge=1, le=200)] = 20) -> list[ScoredItemOut]:
    return [ScoredItemOut(item_id=s.item_id, score=float(s.score)) for s in services.recommender.similar(item_id, k)]


@router.get("/trending", response_model=list[ScoredItemOut],
            summary="Trending items, global or for one segment (the user property named by segment_property)")
def trending(key: ReadKey, services: ServicesDep, k: Annotated[int, Query(ge=1, le=200)] = 20,
             segment: Annotated[str | None, Query(min_length=1, max_length=256, pattern=ID_PATTERN)] = None,
             ) -> list[ScoredItemOut]:
    return [ScoredItemOut(item_id=s.item_id, score=float(s.score))
            for s in services.recommender.trending(k, segment=segment)]


# the SQL functions' messages about a request field ("pgrec.rerank: context.exclude must be a list of item ids",
# "pgrec.candidates: unknown surface "x"", "pgrec.rerank: the range minimum must be a number, got ...")
_ABOUT_FIELD = re.compile(r"^(?:pgrec\.\w+: )?(?P<field>k|user_id|context(?:\.\w+)?) (?P<reason>.+)$", re.DOTALL)
_ABOUT_SURFACE = re.compile(r"^(?:pgrec\.\w+: )?(?P<reason>unknown surface .+)$", re.DOTALL)
_ABOUT_PARAMS = re.compile(r"^(?:pgrec\.\w+: )?(?P<reason>the range \w+ must be a number.*)$", re.DOTALL)


def _name_field(message: str) -> InvalidRequest:
    """The facade's InvalidRequest as ``field: reason`` (the 422's ``loc`` names the request field)."""
    if m := _ABOUT_FIELD.match(message):
        return InvalidRequest(f"{m['field']}: {m['reason']}")
    if m := _ABOUT_SURFACE.match(message):
        return InvalidRequest(f"surface: {m['reason']}")
    if m := _ABOUT_PARAMS.match(message):
        return InvalidRequest(f"context.params: {m['reason']}")
    return InvalidRequest(message)


def _sources(reasons: dict[str, object]) -> list[str]:
    raw = reasons.get("sources")
    if isinstance(raw, str):
        return [s for s in raw.split(",") if s]
    if isinstance(raw, list | tuple):
        return [str(s) for s in raw]
    if isinstance(raw, dict):
        return [str(s) for s in raw]
    return []
