"""Errors the public surface raises; the HTTP layer maps them to status codes."""

from __future__ import annotations


class PgrecError(Exception):
    """Base class."""


class NotFound(PgrecError):
    """An unknown id (item, user, model version, policy ...). HTTP 404."""


class InvalidRequest(PgrecError, ValueError):
    """Bad input; the message names the field and the reason. HTTP 422."""


class Unavailable(PgrecError):
    """The database cannot be reached in time. HTTP 503."""
