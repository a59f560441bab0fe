"""CLI commands for service (registered on the groups of engine.cli.app)."""

from __future__ import annotations
