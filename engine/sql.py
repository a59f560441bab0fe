"""SQL by name: statements the Python layer runs live in ``sql/queries/<group>.sql``.

Each statement starts with a ``-- name: <name>`` line and is called as ``query("<group>.<name>")``,
so finding every caller of a statement is one grep.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_NAME = re.compile(r"^--\s*name:\s*([a-z0-9_]+)\s*$", re.MULTILINE)


def resource_dir(name: str) -> Path:
    """``sql`` or ``migrations``: inside the wheel (engine/_sql) or beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / f"_{name}"
    return packaged if packaged.is_dir() else here.parent / name


def sql_dir() -> Path:
    return resource_dir("sql")


@cache
def _group(group: str) -> dict[str, str]:
    path = sql_dir() / "queries" / f"{group}.sql"
    text = path.read_text()
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for i in range(1, len(parts), 2):
        out[parts[i]] = parts[i + 1].strip().rstrip(";").strip()
    return out


def query(name: str) -> str:
    """The statement called ``group.name``; KeyError names what is missing."""
    group, _, stmt = name.partition(".")
    statements = _group(group)
    if stmt not in statements:
        raise KeyError(f"no statement {stmt!r} in sql/queries/{group}.sql")
    return statements[stmt]


def read(relative: str) -> str:
    """A whole file under sql/ (functions, views, triggers)."""
    return (sql_dir() / relative).read_text()
