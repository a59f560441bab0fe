"""The HTTP service (FastAPI). Imported only by the serving process, never by training code."""

from engine.api.app import create_app
from engine.api.deps import ServiceConfig

__all__ = ["ServiceConfig", "create_app"]
