"""Prometheus metrics of the service.

With several uvicorn workers, ``pgrec serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start,
so every worker writes its samples there and ``/metrics`` on any worker reports the sum over all of them
(prometheus-client's multiprocess mode; gauges are not used for that reason).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess as _mp

_LATENCY = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUEST_SECONDS = Histogram(
    "pgrec_http_request_duration_seconds", "HTTP request latency by endpoint (route template) and method",
    ["endpoint", "method"], buckets=_LATENCY)
REQUESTS = Counter(
    "pgrec_http_requests_total", "HTTP requests by endpoint, method and status code",
    ["endpoint", "method", "status"])
ERRORS = Counter(
    "pgrec_errors_total", "Error responses by kind (validation, not_found, auth, unavailable, internal, ...)",
    ["kind"])
STAGE_SECONDS = Histogram(
    "pgrec_stage_duration_seconds", "Time per funnel stage of a recommendation (from Recommendation.timings_ms)",
    ["stage"], buckets=_LATENCY)
CANDIDATES = Counter(
    "pgrec_candidates_total", "Candidates (or, when the facade reports no counts, served items) per source",
    ["source"])
POLICY_DROPS = Counter("pgrec_policy_drops_total", "Items removed by re-ranking policies", ["policy"])
RECOMMENDATIONS = Counter(
    "pgrec_recommendations_total", "Recommendation lists served by surface and variant", ["surface", "variant"])
EVENTS = Counter("pgrec_events_total", "Events received by outcome (stored, duplicate)", ["outcome"])


def observe_recommendation(surface: str, variant: str | None, timings_ms: Mapping[str, float],
                           dropped: Mapping[str, int], sources: Mapping[str, int]) -> None:
    RECOMMENDATIONS.labels(surface, variant or "").inc()
    for stage, ms in timings_ms.items():
        STAGE_SECONDS.labels(stage).observe(float(ms) / 1000.0)
    for policy, n in dropped.items():
        if n:
            POLICY_DROPS.labels(policy).inc(n)
    for source, n in sources.items():
        if n:
            CANDIDATES.labels(source).inc(n)


def exposition() -> tuple[bytes, str]:
    """The text format for ``/metrics``: this process, or all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
