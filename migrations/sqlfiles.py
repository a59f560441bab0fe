"""Run the SQL files of sql/ from migrations.

A migration's upgrade applies ``sql/<concern>/vN.sql``; its downgrade re-applies ``vN-1`` or, for v1,
drops what v1 created. Files run through the driver with parameters off: ``op.execute`` breaks on
``:name`` inside literals and plain ``exec_driver_sql`` breaks on ``%``, which plpgsql format() uses.
A released file is never edited; a change is a new vN and a new migration.
"""

from __future__ import annotations

import re
from pathlib import Path

from alembic import op
from sqlalchemy import text

_OBJ = re.compile(
    r"^\s*CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE|VIEW|MATERIALIZED\s+VIEW)\s+pgrec\.([a-z0-9_]+)",
    re.IGNORECASE | re.MULTILINE,
)


def sql_root() -> Path:
    here = Path(__file__).resolve().parent
    packaged = here.parent / "_sql"  # inside the wheel: engine/_migrations -> engine/_sql
    return packaged if packaged.is_dir() else here.parent / "sql"


def _run(path: Path) -> None:
    op.get_bind().exec_driver_sql(path.read_text(), execution_options={"no_parameters": True})


def apply(concern: str, version: int) -> None:
    _run(sql_root() / concern / f"v{version}.sql")


def revert(concern: str, version: int) -> None:
    """Undo ``apply(concern, version)``: re-apply the previous version or drop v1's objects."""
    if version > 1:
        # drop what vN created that vN-1 does not, then restore vN-1
        new = _objects(concern, version) - _objects(concern, version - 1)
        _drop(new)
        apply(concern, version - 1)
        return
    _drop(_objects(concern, 1))


def _objects(concern: str, version: int) -> set[tuple[str, str]]:
    text_ = (sql_root() / concern / f"v{version}.sql").read_text()
    return {(" ".join(kind.upper().split()), name) for kind, name in _OBJ.findall(text_)}


def _drop(objects: set[tuple[str, str]]) -> None:
    bind = op.get_bind()
    for kind, name in sorted(objects, key=lambda o: o[0] != "VIEW"):  # views before functions
        bind.execute(text(f"DROP {kind} IF EXISTS pgrec.{name} CASCADE"))


def seed_config(rows: list[tuple[str, str, str]]) -> None:
    """Add rows (key, JSON value, description) to pgrec.config; a key already there keeps its value."""
    for key, value, description in rows:
        op.get_bind().exec_driver_sql(
            "INSERT INTO pgrec.config (key, value, description) VALUES (%(k)s, %(v)s::jsonb, %(d)s) "
            "ON CONFLICT (key) DO NOTHING",
            {"k": key, "v": value, "d": description},
        )


def drop_config(rows: list[tuple[str, str, str]]) -> None:
    """Remove what :func:`seed_config` added."""
    for key, _, _ in rows:
        op.get_bind().exec_driver_sql("DELETE FROM pgrec.config WHERE key = %(k)s", {"k": key})
