"""A/B experiments: per surface, variants that differ by ranker version and/or policy set, with traffic shares.

A user's variant is a stable function of (user, experiment): the first 52 bits of
sha256(experiment + ":" + user_id) give a bucket in [0, 1); variants, in name order, take consecutive
slices of [0, 1) in proportion to their shares. ``pgrec.assign_variant`` in SQL computes the same thing.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

from engine.errors import InvalidRequest, NotFound
from engine.ranking.compile import install_compiled_model
from engine.sql import query

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# An event that cites a request id may be stamped up to this long before the list was served: its time comes
# from the client's clock, served_at from the database's. The online report, the ranker's labels from
# impressions and the retrieval model's ignored impressions all take it from here.
CITATION_CLOCK_SLACK = timedelta(minutes=5)


@dataclass(frozen=True)
class Variant:
    """What a request is served with; passed to ``Recommender.recommend`` and logged with each impression."""

    name: str
    model_version: int | None = None
    policy_set: str | None = None
    experiment: str | None = None  # logged with the impressions (None: the report derives it from the time)


@dataclass(frozen=True)
class VariantSpec:
    name: str
    share: float
    model_version: int | None = None
    policy_set: str | None = None


@dataclass(frozen=True)
class Experiment:
    name: str
    surface: str
    variants: tuple[VariantSpec, ...]
    active: bool = True
    description: str | None = None


def bucket(user_id: str, experiment: str) -> float:
    """The user's stable position in [0, 1) for this experiment (same as ``pgrec.variant_bucket``)."""
    digest = hashlib.sha256(f"{experiment}:{user_id}".encode()).hexdigest()
    return int(digest[:13], 16) / float(1 << 52)


def pick(user_id: str, experiment: Experiment) -> Variant | None:
    """The variant of ``experiment`` this user sees (None when it has no variants)."""
    specs = sorted(experiment.variants, key=lambda v: v.name)
    if not specs:
        return None
    total = sum(v.share for v in specs)
    b = bucket(user_id, experiment.name)
    running = 0.0
    for v in specs:
        running += v.share
        if running / total > b:
            return Variant(v.name, v.model_version, v.policy_set, experiment.name)
    last = specs[-1]  # only reachable through rounding
    return Variant(last.name, last.model_version, last.policy_set, experiment.name)


def validate(name: str, surface: str, variants: Sequence[VariantSpec]) -> None:
    """Raise InvalidRequest naming the field when an experiment definition is malformed."""
    if not _NAME.match(name):
        raise InvalidRequest(f"name: {name!r} must match {_NAME.pattern}")
    if not variants:
        raise InvalidRequest("variants: at least one variant is required")
    seen: set[str] = set()
    for i, v in enumerate(variants):
        if not _NAME.match(v.name):
            raise InvalidRequest(f"variants[{i}].name: {v.name!r} must match {_NAME.pattern}")
        if v.name in seen:
            raise InvalidRequest(f"variants[{i}].name: duplicate variant {v.name!r}")
        seen.add(v.name)
        if not (0 < v.share <= 1):
            raise InvalidRequest(f"variants[{i}].share: must be in (0, 1], got {v.share}")
    total = sum(v.share for v in variants)
    if abs(total - 1.0) > 1e-6:
        raise InvalidRequest(f"variants: shares must sum to 1, got {total:g}")


def create(conn: psycopg.Connection[Any], name: str, surface: str, variants: Sequence[VariantSpec],
           description: str | None = None) -> Experiment:
    """Start an experiment on a surface (one active experiment per surface). Changes nothing on error."""
    validate(name, surface, variants)
    with conn.transaction():
        if conn.execute(query("service.surface_exists"), {"surface": surface}).fetchone() is None:
            raise NotFound(f"surface: unknown surface {surface!r}")
        if conn.execute(query("service.experiment_state"), {"experiment": name}).fetchone() is not None:
            raise InvalidRequest(f"name: experiment {name!r} already exists")
        for i, v in enumerate(variants):
            if v.policy_set is not None and conn.execute(query("service.policy_set_exists"), {
                    "policy_set": v.policy_set, "surface": surface}).fetchone() is None:
                # the policies of another set never apply, so a misspelt set made the test an A/A test
                raise NotFound(f"variants[{i}].policy_set: no enabled policy of policy set {v.policy_set!r} "
                               f"applies on surface {surface!r}")
            if v.model_version is None:
                continue
            row = conn.execute(query("service.model_exists"), {"version": v.model_version}).fetchone()
            if row is None:
                raise NotFound(f"variants[{i}].model_version: unknown model version {v.model_version}")
            if row[0] != "ranker":
                raise InvalidRequest(f"variants[{i}].model_version: model version {v.model_version} is a "
                                     f"{row[0]} model, not a ranker")
            # SQL-only apps serve the arm through pgrec.recommend(model_version => ...): compile it now (a model
            # stored without activation was not compiled); one the compiler refuses refuses the experiment
            install_compiled_model(conn, v.model_version)
        try:
            with conn.transaction():
                conn.execute(query("service.insert_experiment"),
                             {"experiment": name, "surface": surface, "description": description})
        except psycopg.errors.UniqueViolation:
            raise InvalidRequest(
                f"surface: {surface!r} already has an active experiment; end it first") from None
        for v in variants:
            conn.execute(query("service.insert_variant"),
                         {"experiment": name, "variant": v.name, "share": v.share,
                          "model_version": v.model_version, "policy_set": v.policy_set})
    return Experiment(name, surface, tuple(variants), True, description)


def end(conn: psycopg.Connection[Any], name: str) -> None:
    """Stop an experiment (its rows stay for the report). NotFound for an unknown or already ended one."""
    with conn.transaction():
        if conn.execute(query("service.end_experiment"), {"experiment": name}).fetchone() is None:
            state = conn.execute(query("service.experiment_state"), {"experiment": name}).fetchone()
            if state is None:
                raise NotFound(f"experiment: unknown experiment {name!r}")
            raise NotFound(f"experiment: {name!r} has already ended")


def list_experiments(conn: psycopg.Connection[Any], *, include_ended: bool = False) -> list[Experiment]:
    out = []
    for name, surface, active, description, _created, _ended, variants in conn.execute(
            query("service.list_experiments"), {"all": include_ended}).fetchall():
        specs = tuple(VariantSpec(v["name"], float(v["share"]), v["model_version"], v["policy_set"])
                      for v in variants)
        out.append(Experiment(name, surface, specs, bool(active), description))
    return out


def assign_sql(conn: psycopg.Connection[Any], user_id: str, surface: str = "default") -> Variant | None:
    """The variant by ``pgrec.assign_variant`` (for SQL callers; the service uses :class:`Assigner`)."""
    row = conn.execute(query("service.assign_variant"), {"user_id": user_id, "surface": surface}).fetchone()
    return None if row is None else Variant(row[1], row[2], row[3], row[0])


class Assigner:
    """Assigns variants in process from the active experiments, re-read at most every ``ttl_s`` seconds.

    A change of experiments reaches every service copy within ``ttl_s``.
    """

    def __init__(self, load: Callable[[], list[Experiment]], ttl_s: float = 5.0) -> None:
        self._load = load
        self._ttl = ttl_s
        self._by_surface: dict[str, Experiment] = {}
        self._loaded_at = -float("inf")
        self._lock = threading.Lock()

    def refresh(self) -> None:
        experiments = self._load()
        with self._lock:
            self._by_surface = {e.surface: e for e in experiments if e.active}
            self._loaded_at = time.monotonic()

    def assign(self, user_id: str, surface: str) -> Variant | None:
        if time.monotonic() - self._loaded_at > self._ttl:
            self.refresh()
        exp = self._by_surface.get(surface)
        return None if exp is None else pick(user_id, exp)


@dataclass(frozen=True)
class ReportRow:
    """Online results of one (surface, experiment, variant, position); position None is the total over positions;
    experiment '' for impressions served outside any experiment."""

    surface: str
    experiment: str
    variant: str
    position: int | None
    impressions: int
    clicks: int
    conversions: int

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    @property
    def conversion_rate(self) -> float:
        return self.conversions / self.impressions if self.impressions else 0.0


def online_report(conn: psycopg.Connection[Any], *, since: datetime | None = None,
                  surface: str | None = None) -> list[ReportRow]:
    """Impressions, clicks and conversions per surface, experiment, variant and position, from impressions
    joined with events: by the request id the event cites (from ``CITATION_CLOCK_SLACK`` before the impression
    on), else the same user and
    item within the attribution window (config ``report_attribution_hours``), credited once, to the latest
    impression before the event; click and conversion types in ``report_click_types`` /
    ``report_conversion_types``."""
    rows = conn.execute(query("service.online_report"),
                        {"since": since, "surface": surface, "slack": CITATION_CLOCK_SLACK}).fetchall()
    return [ReportRow(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6])) for r in rows]
