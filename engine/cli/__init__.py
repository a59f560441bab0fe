"""``pgrec`` command line. Each module registers its commands on the groups of ``engine.cli.app``."""

from __future__ import annotations

import importlib

from engine.cli.app import app

# one module per concern; each registers its commands on import
_MODULES = ("core", "candidates", "retrieval", "ranker", "policies", "serving", "service", "sources", "config")
for _name in _MODULES:
    importlib.import_module(f"engine.cli.{_name}")


def main() -> None:
    import psycopg
    from alembic.util import CommandError
    from pydantic import ValidationError
    from rich.markup import escape

    from engine.cli.app import err_console
    from engine.db import DatabaseError

    try:
        app()
    except ValidationError as exc:  # a PGREC_* setting with a value it cannot take
        bad = "; ".join(f"PGREC_{'_'.join(str(x) for x in e['loc']).upper()}: {e['msg']}" for e in exc.errors())
        err_console.print(f"[bold red]error:[/] invalid setting: {escape(bad)}")
        raise SystemExit(1) from None
    except CommandError as exc:  # alembic: an unknown revision, nothing to downgrade
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(1) from None
    except psycopg.errors.UndefinedTable as exc:  # any command, before `pgrec db upgrade`
        err_console.print(f"[bold red]error:[/] the pgrec schema is not installed here ({escape(str(exc.diag.message_primary))}): "
                          "run `pgrec db upgrade`")
        raise SystemExit(1) from None
    except DatabaseError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise SystemExit(1) from None


__all__ = ["app", "main"]
