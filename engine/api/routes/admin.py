"""Administration (scope admin): A/B experiments, the online report, policies and models."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Path, Query

from engine import experiments
from engine.api.deps import AdminKey, Conn, ServicesDep
from engine.api.schemas import (
    ID_PATTERN,
    ContributionOut,
    ExperimentIn,
    ExperimentOut,
    ExplanationOut,
    ReportRow,
    UtcTime,
    VariantIn,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"])

ExperimentName = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]


def _out(e: experiments.Experiment) -> ExperimentOut:
    return ExperimentOut(name=e.name, surface=e.surface, active=e.active, description=e.description,
                         variants=[VariantIn(name=v.name, share=v.share, model_version=v.model_version,
                                             policy_set=v.policy_set) for v in e.variants])


@router.post("/experiments", response_model=ExperimentOut, status_code=201,
             responses={404: {"description": "unknown surface or model version"}},
             summary="Start an A/B experiment on a surface (shares must sum to 1; one active per surface)")
def create_experiment(body: ExperimentIn, key: AdminKey, conn: Conn, services: ServicesDep) -> ExperimentOut:
    specs = [experiments.VariantSpec(v.name, v.share, v.model_version, v.policy_set) for v in body.variants]
    exp = experiments.create(conn, body.name, body.surface, specs, body.description)
    services.assigner.refresh()
    return _out(exp)


@router.get("/experiments", response_model=list[ExperimentOut], summary="Experiments (active, or all)")
def list_experiments(key: AdminKey, conn: Conn, include_ended: bool = False) -> list[ExperimentOut]:
    return [_out(e) for e in experiments.list_experiments(conn, include_ended=include_ended)]


@router.post("/experiments/{name}/end", status_code=204, responses={404: {"description": "unknown or ended"}},
             summary="End an experiment (its impressions stay for the report)")
def end_experiment(name: ExperimentName, key: AdminKey, conn: Conn, services: ServicesDep) -> None:
    experiments.end(conn, name)
    services.assigner.refresh()


@router.get("/report/online", response_model=list[ReportRow],
            summary="Impressions, CTR and conversion per surface, experiment, variant and position")
def report_online(key: AdminKey, conn: Conn, since: UtcTime | None = None,
                  surface: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")] = None,
                  ) -> list[ReportRow]:
    return [ReportRow(surface=r.surface, experiment=r.experiment, variant=r.variant, position=r.position,
                      impressions=r.impressions, clicks=r.clicks, conversions=r.conversions, ctr=r.ctr,
                      conversion_rate=r.conversion_rate)
            for r in experiments.online_report(conn, since=since, surface=surface)]


@router.get("/requests/{request_id}/items/{item_id:path}/explanation", response_model=ExplanationOut,
            responses={404: {"description": "the request did not show the item, or there is no such request"},
                       422: {"description": "the list was ranked without a ranker"}},
            summary="Why a served item stood where it did: the ranker's features and their contributions")
def explain_served(request_id: UUID, item_id: Annotated[str, Path(min_length=1, max_length=256, pattern=ID_PATTERN)],
                   key: AdminKey, conn: Conn) -> ExplanationOut:
    from engine.ranking import explain

    ex = explain.explain_served(conn, request_id, item_id)
    assert ex.position is not None and ex.stored_features is not None
    return ExplanationOut(request_id=str(request_id), user_id=ex.user_id, item_id=ex.item_id, position=ex.position,
                          sources=ex.sources, as_of=ex.as_of,
                          served_score=ex.served_score, model_version=ex.model_version, score=ex.score,
                          base=ex.base, stored_features=ex.stored_features,
                          contributions=[ContributionOut(name=c.name, value=c.value, contribution=c.contribution)
                                         for c in ex.contributions])
