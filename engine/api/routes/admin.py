"""Administration (scope admin): A/B experiments, the online report, policies and models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from engine import experiments
from engine.api.deps import AdminKey, Conn, ServicesDep
from engine.api.schemas import ExperimentIn, ExperimentOut, ReportRow, UtcTime, VariantIn

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
