#!/bin/sh
# First start of the compose PostgreSQL only (the image runs /docker-entrypoint-initdb.d/ on an
# empty data directory, as the superuser): the two roles of docs/security.md with LOGIN and
# their passwords from the environment, and the database handed to the owner role, which
# `rebalancer db migrate` (the compose file's `migrate` step) then runs the migrations as.
# Changing a password later: `alter role ... password ...` as the superuser.
set -eu
: "${REBALANCER_OWNER_PASSWORD:?}" "${REBALANCER_SERVICE_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v owner_password="$REBALANCER_OWNER_PASSWORD" \
     -v service_password="$REBALANCER_SERVICE_PASSWORD" \
     -v dbname="$POSTGRES_DB" <<'SQL'
create role rebalancer_owner login createdb password :'owner_password';
create role rebalancer_service login nocreatedb password :'service_password';
-- What events/sql/011_roles.sql cannot set as the owner (it needs a superuser here).
alter role rebalancer_service set statement_timeout = '30s';
alter database :"dbname" owner to rebalancer_owner;
SQL
