#!/bin/sh
# Start the MLflow tracking server that `ats search --tracking-uri http://HOST:PORT` reports to.
# Every setting comes from the environment; the defaults serve this machine only:
#   ATS_MLFLOW_BACKEND    runs database: sqlite:///path/mlflow.db or postgresql://user@host:5432/db
#                         (PostgreSQL passwords go in ~/.pgpass or PGPASSWORD, never in this file)
#   ATS_MLFLOW_ARTIFACTS  artifact root the server writes and serves (a folder, or s3://bucket/path)
#   ATS_MLFLOW_HOST       interface to bind; 0.0.0.0 to serve a Ray cluster's nodes
#   ATS_MLFLOW_PORT       port
#   ATS_MLFLOW_WORKERS    server worker processes
#   MLFLOW_SERVER_ALLOWED_HOSTS  extra Host names clients use (localhost and private IPs pass)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$here/data"
# MLflow's job runner serves GenAI features that ats does not use; it starts several processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec ats server \
    --backend-store-uri "${ATS_MLFLOW_BACKEND:-sqlite:///$here/data/mlflow.db}" \
    --artifacts-destination "${ATS_MLFLOW_ARTIFACTS:-$here/data/artifacts}" \
    --host "${ATS_MLFLOW_HOST:-127.0.0.1}" \
    --port "${ATS_MLFLOW_PORT:-5000}" \
    --workers "${ATS_MLFLOW_WORKERS:-1}"
