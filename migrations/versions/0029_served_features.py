"""serving v6 + config v2: a served list keeps the feature rows its items were ranked with

Training the ranker from served lists recomputed each list's features from the event log with the stage-1
models stored at training time (item vectors, co-occurrence, EASE neighbours): once those were rebuilt after the
clicks, they had seen them, and the clicked items' features were optimistic. ``pgrec.finish_request`` now stores
the shown items' feature rows with the impressions (``pgrec.served_features``, one row per logged request), from
both serving paths, unless config ``log_served_features`` (a new boolean key) is false. Feature lists are kept
once each in ``pgrec.feature_sets``: the stored rankers' lists now, every new ranker's by a trigger. Two small
functions keep one rule each: ``pgrec.served_features_on()`` (the config key and its default) and
``pgrec.features_time()`` (the time a list's features are recomputed as of when they were not stored).

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
  'The feature lists of the rankers (registered when a ranker is stored: trigger models_feature_set), which '
  'served lists refer to.';
INSERT INTO pgrec.feature_sets (names)
SELECT DISTINCT ARRAY(SELECT jsonb_array_elements_text(m.features))
  FROM pgrec.models m
 WHERE m.kind = 'ranker' AND jsonb_typeof(m.features) = 'array' AND jsonb_array_length(m.features) > 0;

-- per user, as the impressions (the write path can be distributed by user_key)
CREATE TABLE pgrec.served_features (
    user_key    bigint NOT NULL,
    request_id  uuid NOT NULL,
    served_at   timestamptz NOT NULL DEFAULT now(),
    feature_set int REFERENCES pgrec.feature_sets,
    names       text[],
    item_keys   bigint[] NOT NULL,
    features    float8[] NOT NULL,
    PRIMARY KEY (user_key, request_id),
    CHECK ((feature_set IS NULL) <> (names IS NULL)),
    CHECK (cardinality(item_keys) > 0 AND array_ndims(features) = 3
           AND array_length(features, 1) = cardinality(item_keys) AND array_length(features, 2) = 1)
);
COMMENT ON TABLE pgrec.served_features IS
  'Per logged request: the shown items that were candidates (in position order) and the feature rows they were '
  'ranked with, one 1 x F slice per item (features[i][1][j]: item i, feature j of the feature set; NULL or NaN = '
  'missing). names: the feature list when it was not registered (feature_set NULL). Written by '
  'pgrec.finish_request; read by `pgrec train ranker --from impressions` and `pgrec explain --request`.';
-- for retention (DELETE ... WHERE served_at < ...: docs/scaling.md)
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
