"""serving v6 + config v2: a served list keeps the feature rows its items were ranked with

Training the ranker from served lists recomputed each list's features from the event log with the stage-1
models stored at training time (item vectors, co-occurrence, EASE neighbours): once those were rebuilt after the
clicks, they had seen them, and the clicked items' features were optimistic. ``pgrec.finish_request`` now stores
the shown items' feature rows with the impressions (``pgrec.served_features``, one row per logged request; the
feature names once per distinct list in ``pgrec.feature_sets``), from both serving paths, unless config
``log_served_features`` (a new boolean key) is false.

Revision ID: 0029
Revises: 0028
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None

CONFIG = [
    ("log_served_features", "true",
     "store the feature rows each served list was ranked with (pgrec.served_features), for training from served "
     "lists"),
]


def upgrade() -> None:
    op.get_bind().exec_driver_sql(
        """
CREATE TABLE pgrec.feature_sets (
    feature_set int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    names       text[] NOT NULL UNIQUE CHECK (cardinality(names) > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgrec.feature_sets IS
  'The feature lists served lists were ranked with (a ranker''s feature list), once each.';

-- per user, as the impressions (the write path can be distributed by user_key)
CREATE TABLE pgrec.served_features (
    user_key    bigint NOT NULL,
    request_id  uuid NOT NULL,
    served_at   timestamptz NOT NULL DEFAULT now(),
    feature_set int NOT NULL REFERENCES pgrec.feature_sets,
    item_keys   bigint[] NOT NULL,
    features    float8[] NOT NULL,
    PRIMARY KEY (user_key, request_id),
    CHECK (cardinality(item_keys) > 0 AND array_ndims(features) = 1
           AND cardinality(features) % cardinality(item_keys) = 0)
);
COMMENT ON TABLE pgrec.served_features IS
  'Per logged request: the shown items (those that were candidates, in position order) and their feature rows '
  'as ranked, row after row (cardinality(item_keys) rows of cardinality(names) values; NULL = missing). Written '
  'by pgrec.finish_request; read by `pgrec train ranker --from impressions`.';
CREATE INDEX served_features_time ON pgrec.served_features (served_at);
""",
        execution_options={"no_parameters": True},
    )
    sqlfiles.apply("config", 2)
    sqlfiles.seed_config(CONFIG)
    sqlfiles.apply("serving", 6)


def downgrade() -> None:
    # v6's finish_request has two more parameters: drop it; reverting restores v5's (and v2's pgrec.recommend)
    op.execute("DROP FUNCTION pgrec.finish_request(text, text, int, bigint[], float8[], text[], jsonb, timestamptz, "
               "text, bigint, text, boolean, text, text[], float8[])")
    sqlfiles.revert_partial("serving", 6)
    op.execute("DELETE FROM pgrec.config WHERE key = 'log_served_features'")  # config v1 does not know it
    sqlfiles.revert_partial("config", 2)
    op.execute("DROP TABLE pgrec.served_features, pgrec.feature_sets")
