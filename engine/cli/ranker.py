"""CLI commands for ranker (registered on the groups of engine.cli.app)."""

from __future__ import annotations
