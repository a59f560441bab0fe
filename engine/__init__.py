"""pgrec: a recommendation engine that lives inside PostgreSQL + pgvector.

The public surface is small; everything else is reached through its module.
"""

from engine.config import Settings, get_settings

__all__ = ["Settings", "get_settings"]
__version__ = "0.1.0"
