-- pgrec.config, the settings the SQL functions read (engine/cli/config.py, `pgrec config ...`).
-- The database checks every write (sql/config/v1.sql); these statements only read and write rows.

-- name: rows
-- Every known key with its value (NULL when the row is missing: the readers' built-in default applies).
SELECT s.key, c.value, s.expects, s.fixed, s.after_change, c.description, c.updated_at
  FROM pgrec.config_specs() s
  LEFT JOIN pgrec.config c ON c.key = s.key
 ORDER BY s.key

-- name: set
-- Insert or change one key; returns the row as stored and what to run after the change, if anything.
WITH w AS (
    INSERT INTO pgrec.config (key, value)
    VALUES (%(key)s, %(value)s)
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value
    RETURNING key, value)
SELECT w.key, w.value, s.after_change
  FROM w LEFT JOIN pgrec.config_specs() s ON s.key = w.key
