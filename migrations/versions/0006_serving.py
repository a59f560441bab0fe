"""serving: compiled rankers, pgrec.recommend / finish_request, the pgrec_app role

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# What a least-privilege app role may call. Everything else in schema pgrec is not executable by PUBLIC.
APP_FUNCTIONS = (
    "pgrec.recommend(text, int, text, jsonb, timestamptz, bigint, text, text, boolean)",
    "pgrec.similar_items(text, int)",
    "pgrec.trending_items(text, int, timestamptz)",
    "pgrec.track_event(text, text, text, timestamptz, numeric, text, jsonb, uuid)",
)

_ROLE = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgrec_app') THEN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
            BEGIN
                CREATE ROLE pgrec_app NOLOGIN;
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database of this cluster made it at the same moment
            END;
        ELSE
            RAISE NOTICE 'pgrec: role pgrec_app not created (the migrating role may not create roles); '
                         'create it (CREATE ROLE pgrec_app NOLOGIN) and run the grants in README "Least-privilege role"';
        END IF;
    END IF;
END
$$;
"""


def grant_sql() -> str:
    """The grants for pgrec_app (also run by hand when the role is created after the migration)."""
    funcs = ", ".join(APP_FUNCTIONS)
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgrec_app') THEN
        GRANT USAGE ON SCHEMA pgrec TO pgrec_app;
        GRANT EXECUTE ON FUNCTION {funcs} TO pgrec_app;
    END IF;
END
$$;
"""


def upgrade() -> None:
    bind = op.get_bind()
    bind.exec_driver_sql(
        """
CREATE TABLE pgrec.compiled_rankers (
    version       bigint PRIMARY KEY REFERENCES pgrec.models (version) ON DELETE CASCADE,
    function_name text NOT NULL UNIQUE CHECK (function_name ~ '^ranker_score_v[0-9]+$'),
    features      jsonb NOT NULL CHECK (jsonb_typeof(features) = 'array'),
    num_trees     int NOT NULL,
    installed_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgrec.compiled_rankers IS
  'Ranker models compiled to SQL (engine/ranking/compile.py): pgrec.<function_name>(float8[]) scores a feature '
  'array in the order of features.';
INSERT INTO pgrec.config (key, value, description) VALUES
  ('serving_candidates', '200', 'candidates ranked per request, by both the Python and the SQL path')
ON CONFLICT DO NOTHING;
"""
    )
    sqlfiles.apply("serving", 1)
    # Functions are executable by PUBLIC by default: an app role with USAGE on the schema could then call the
    # internal SECURITY DEFINER functions (finish_request, upsert_*, ...). Revoke, now and for later ones.
    bind.exec_driver_sql(
        """
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA pgrec FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgrec REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
"""
    )
    bind.exec_driver_sql(_ROLE, execution_options={"no_parameters": True})
    bind.exec_driver_sql(grant_sql(), execution_options={"no_parameters": True})


def downgrade() -> None:
    bind = op.get_bind()
    # the role is cluster-wide (other databases may use it): only this database's grants go
    bind.exec_driver_sql(
        """
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgrec_app') THEN
        REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgrec FROM pgrec_app;
        REVOKE USAGE ON SCHEMA pgrec FROM pgrec_app;
    END IF;
END
$$;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgrec GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgrec TO PUBLIC;
""",
        execution_options={"no_parameters": True},
    )
    sqlfiles.revert("serving", 1)
    bind.exec_driver_sql(
        """
DO $$
DECLARE f text;
BEGIN  -- the functions install_compiled_model made
    FOR f IN SELECT function_name FROM pgrec.compiled_rankers LOOP
        EXECUTE format('DROP FUNCTION IF EXISTS pgrec.%I(float8[])', f);
    END LOOP;
END
$$;
DROP TABLE IF EXISTS pgrec.compiled_rankers;
DELETE FROM pgrec.config WHERE key = 'serving_candidates';
""",
        execution_options={"no_parameters": True},
    )
