#!/usr/bin/env bash
# Runs once, when the container initialises an empty data directory (docker-entrypoint-initdb.d).
# Creates the role walbridge connects as and a demo table. The password comes from the same
# secret file walbridge reads (password_file), never from the environment or the command line.
set -euo pipefail

password_file=/run/secrets/db_password
if [ ! -s "$password_file" ]; then
  echo "initdb: $password_file is missing or empty; create deploy/secrets/db_password" >&2
  exit 1
fi

# psql variables are quoted by psql itself (:'pw'), so any password is safe here.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v pw="$(cat "$password_file")" <<'SQL'
-- walbridge setup creates a publication, slots, origins, a schema and triggers; the demo gives
-- its role superuser rights to keep it short. See deploy/README.md for a narrower role.
CREATE ROLE walbridge LOGIN SUPERUSER REPLICATION PASSWORD :'pw';

CREATE TABLE public.accounts (
    id         bigint PRIMARY KEY,
    owner      text NOT NULL,
    balance    numeric(12, 2) NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
SQL
