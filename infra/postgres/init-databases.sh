#!/bin/sh
# Creates the two databases of the stack, each with its own login role:
#   mlflow  (owner $MLFLOW_DB_USER)   - MLflow's runs, metrics and model registry
#   prefect (owner $PREFECT_DB_USER)  - Prefect's flows, deployments and schedules
#
# The postgres image runs the scripts in /docker-entrypoint-initdb.d/ once, on the first start
# with an empty data volume. To run it again: docker compose ... down -v (this deletes the data).
set -eu

# Values go in as psql variables, so :"name" and :'password' quote them; nothing is spliced
# into the SQL text by the shell.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v mlflow_user="$MLFLOW_DB_USER" -v mlflow_password="$MLFLOW_DB_PASSWORD" \
    -v prefect_user="$PREFECT_DB_USER" -v prefect_password="$PREFECT_DB_PASSWORD" <<'SQL'
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER :"mlflow_user";
CREATE ROLE :"prefect_user" LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER :"prefect_user";
SQL
