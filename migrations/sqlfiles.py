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


# PostgreSQL lets PUBLIC execute every new function, and a per-schema ALTER DEFAULT PRIVILEGES cannot revoke
# that global default: each file's functions are made private here, right after they are created, so that a
# role with USAGE on the schema (pgrec_app) can call only what it is granted by name (migration 0006's list).
PRIVATE_FUNCTIONS = "REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgrec FROM PUBLIC"


def _run(path: Path) -> None:
    op.get_bind().exec_driver_sql(path.read_text(), execution_options={"no_parameters": True})
    op.get_bind().exec_driver_sql(PRIVATE_FUNCTIONS)


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


def revert_partial(concern: str, version: int) -> None:
    """Undo ``apply(concern, version)`` for a vN that redefines a few functions of earlier files (and is not a
    whole concern): each function it creates gets back its statements (CREATE, COMMENT ON, ALTER) from the latest
    earlier version that creates it; one no earlier version creates is dropped. Signatures must be the same."""
    for kind, name in sorted(_objects(concern, version)):
        for earlier in range(version - 1, 0, -1):
            if (kind, name) in _objects(concern, earlier):
                restore(concern, earlier, name)
                break
        else:
            _drop({(kind, name)})


_STATEMENT = re.compile(r"""(\$[A-Za-z_]*\$)|('(?:[^']|'')*')|("(?:[^"]|"")*")|(--[^\n]*)|(/\*.*?\*/)|(;)""", re.DOTALL)


def statements(text_: str) -> list[str]:
    """The statements of a SQL file: split on the semicolons outside quotes, dollar quotes and comments."""
    out, start, pos = [], 0, 0
    while (m := _STATEMENT.search(text_, pos)) is not None:
        if m.group(1):  # a dollar quote: skip to its end
            end = text_.find(m.group(1), m.end())
            if end < 0:
                raise ValueError(f"unterminated dollar quote {m.group(1)}")
            pos = end + len(m.group(1))
        elif m.group(6):
            out.append(text_[start:m.start()].strip())
            start = pos = m.end()
        else:
            pos = m.end()
    tail = text_[start:].strip()
    return [st for st in [*out, tail] if _code(st)]


def _code(statement: str) -> str:
    return "\n".join(ln for ln in statement.splitlines() if not ln.lstrip().startswith("--")).strip()


def restore(concern: str, version: int, name: str) -> None:
    """Run again the statements of ``sql/<concern>/v<version>.sql`` that create, comment on or alter the function
    or view ``pgrec.<name>``."""
    pattern = re.compile(
        rf"^(?:CREATE\s+(?:OR\s+REPLACE\s+)?(?:FUNCTION|PROCEDURE|VIEW|MATERIALIZED\s+VIEW)|COMMENT\s+ON\s+"
        rf"(?:FUNCTION|PROCEDURE|VIEW)|ALTER\s+(?:FUNCTION|PROCEDURE))\s+pgrec\.{re.escape(name)}\b", re.IGNORECASE)
    found = [st for st in statements((sql_root() / concern / f"v{version}.sql").read_text())
             if pattern.match(_code(st))]
    if not found:
        raise ValueError(f"sql/{concern}/v{version}.sql has no statement for pgrec.{name}")
    for st in found:
        op.get_bind().exec_driver_sql(st, execution_options={"no_parameters": True})
    op.get_bind().exec_driver_sql(PRIVATE_FUNCTIONS)


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
