"""``pgrec`` command line. Each module registers its commands on the groups of ``engine.cli.app``."""

from __future__ import annotations

import importlib

from engine.cli.app import app

# one module per concern; each registers its commands on import
_MODULES = ("core", "candidates", "retrieval", "ranker", "policies", "serving", "service")
for _name in _MODULES:
    importlib.import_module(f"engine.cli.{_name}")


def main() -> None:
    app()


__all__ = ["app", "main"]
