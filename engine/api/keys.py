"""API keys: random tokens of which only the sha256 is stored, with scopes read, write and admin.

A key with scope ``admin`` may call every endpoint; otherwise an endpoint needs its own scope.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from engine.errors import InvalidRequest, NotFound
from engine.sql import query

SCOPES = ("read", "write", "admin")
TOKEN_PREFIX = "pgr_"


@dataclass(frozen=True)
class ApiKey:
    key_id: int
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True)
class KeyInfo:
    key_id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    revoked_at: datetime | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(conn: psycopg.Connection[Any], name: str, scopes: Sequence[str]) -> tuple[str, KeyInfo]:
    """A new key; returns the token (shown once, never stored) and its row."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequest("name: must be 1 to 100 characters")
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise InvalidRequest(f"scopes: must be a non-empty subset of {', '.join(SCOPES)} (got {list(scopes)})")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    prefix = token[:12]
    ordered = [s for s in SCOPES if s in scopes]
    row = conn.execute(query("service.insert_key"),
                       {"name": name, "prefix": prefix, "key_hash": hash_token(token), "scopes": ordered}).fetchone()
    assert row is not None
    if not conn.autocommit:
        conn.commit()
    return token, KeyInfo(int(row[0]), name, prefix, ordered, row[1], None)


def revoke_key(conn: psycopg.Connection[Any], key_id: int) -> None:
    """Revoke a key. NotFound for an unknown or already revoked key."""
    if conn.execute(query("service.revoke_key"), {"key_id": key_id}).fetchone() is None:
        state = conn.execute(query("service.key_exists"), {"key_id": key_id}).fetchone()
        raise NotFound(f"key_id: {'no key' if state is None else 'already revoked key'} {key_id}")
    if not conn.autocommit:
        conn.commit()


def list_keys(conn: psycopg.Connection[Any], *, include_revoked: bool = False) -> list[KeyInfo]:
    return [KeyInfo(int(r[0]), r[1], r[2], list(r[3]), r[4], r[5])
            for r in conn.execute(query("service.list_keys"), {"all": include_revoked}).fetchall()]


class KeyCache:
    """Looks keys up by hash, remembering answers (valid or not) for ``ttl_s`` seconds.

    A revoked key therefore stops working on every service copy within ``ttl_s``; the copy that revoked
    it forgets it at once.
    """

    def __init__(self, pool: ConnectionPool, ttl_s: float = 5.0, max_entries: int = 10_000) -> None:
        self._pool = pool
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, token: str) -> ApiKey | None:
        h = hash_token(token)
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        with self._pool.connection() as conn:
            row = conn.execute(query("service.key_by_hash"), {"key_hash": h}).fetchone()
        key = None if row is None else ApiKey(int(row[0]), row[1], frozenset(row[2]))
        with self._lock:
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[h] = (now, key)
        return key

    def forget(self, key_id: int | None = None) -> None:
        with self._lock:
            if key_id is None:
                self._cache.clear()
            else:
                self._cache = {h: v for h, v in self._cache.items() if v[1] is None or v[1].key_id != key_id}
