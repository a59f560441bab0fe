"""Settings: the one place pgrec reads its environment (prefix ``PGREC_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Process-wide settings. Per-surface behaviour lives in database tables, not here."""

    model_config = SettingsConfigDict(env_prefix="PGREC_", env_file=".env", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="Any PostgreSQL >= 15 with pgvector >= 0.7. Unset: the embedded server is used.",
    )
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("pgrec")),
        description="Where the embedded PostgreSQL keeps its data (pgdata/ below it).",
    )
    database_name: str = Field(default="pgrec", description="Database used on the embedded server.")
    embedding_dim: int = Field(
        default=64, ge=2, le=2000, description="Vector dimension, fixed when the schema is first created."
    )
    event_partition_interval: str = Field(
        default="month", pattern="^(month|year)$",
        description="Events are partitioned by this interval (fixed at install): month, or year for long, thin logs.",
    )
    segment_property: str = Field(
        default="country", description="User property that defines the trending segment (seeded at install)."
    )
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=8, ge=1)
    pool_timeout_s: float = Field(default=5.0, gt=0, description="Wait for a pooled connection at most this long.")
    service_threads: int | None = Field(
        default=None, ge=1,
        description="HTTP service: worker threads per process for the endpoints (None = anyio's 40); the requests "
                    "a process serves at once never exceed it, later ones wait their turn on the event loop.",
    )
    statement_timeout_ms: int = Field(default=10_000, ge=0, description="Per statement, on pooled connections.")
    impressions_sync_commit: bool = Field(
        default=False,
        description="Python path: wait for the WAL flush when a served list's impressions commit. Off: they commit "
                    "asynchronously (a database crash can lose the last fraction of a second of impressions, never "
                    "events, which always commit synchronously), so a request does not queue behind other writers' "
                    "flushes.",
    )
    hnsw_ef_search: int = Field(default=100, ge=1, le=1000)
    hnsw_iterative_scan: str = Field(default="relaxed_order", pattern="^(off|strict_order|relaxed_order)$")
    hnsw_max_scan_tuples: int = Field(default=20_000, ge=1)
    log_level: str = Field(default="INFO")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read once per process."""
    return Settings()
