#!/usr/bin/env bash
# Runs once, from /docker-entrypoint-initdb.d, after 10-commerce.sql (changeflow/deploy/sql/commerce.sql) has
# created the replication role. commerce.sql never holds a password; this gives the role the one
# from the environment (CHANGEFLOW_PG_REPLICATION_PASSWORD, required by docker-compose.yml), so the
# secret exists only in .env and in the containers that need it.
#
# The value travels as a psql variable and is quoted by psql (:'password'), never spliced into SQL
# text. Works both executed and sourced (the entrypoint sources init scripts without the x bit),
# so it sets no shell options of its own; the entrypoint already stops on a failing command.

if [ -z "${CHANGEFLOW_PG_REPLICATION_PASSWORD:-}" ]; then
    echo "20-replication-password.sh: CHANGEFLOW_PG_REPLICATION_PASSWORD is empty" >&2
    exit 1
fi

psql -v ON_ERROR_STOP=1 --no-psqlrc \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-commerce}" \
    -v role="${CHANGEFLOW_PG_REPLICATION_USER:-debezium}" \
    -v password="${CHANGEFLOW_PG_REPLICATION_PASSWORD}" <<'SQL'
ALTER ROLE :"role" WITH LOGIN REPLICATION PASSWORD :'password';
SQL
