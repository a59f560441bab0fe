#!/bin/bash
# Runs once, when the image initialises an empty data volume, as the image's superuser: the role pgrec (not a
# superuser) that owns the database and migrates and serves it, and the vector extension, which only a superuser
# may create. CREATEROLE lets migration 0006 create the NOLOGIN role pgrec_app (README, "Least-privilege role").
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v pw="$PGREC_DB_PASSWORD" <<'SQL'
CREATE ROLE pgrec LOGIN CREATEROLE PASSWORD :'pw';
CREATE DATABASE pgrec OWNER pgrec;
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname pgrec -c 'CREATE EXTENSION IF NOT EXISTS vector SCHEMA public'
