"""CLI commands for serving (registered on the groups of engine.cli.app)."""

from __future__ import annotations
