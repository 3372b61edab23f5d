#!/usr/bin/env bash
# The MLflow tracking server of a carclf cluster: one host (the Ray head node will do), every node logs to it.
#
#   cluster/tracking-server.sh                  # SQLite + artifacts under ~/carclf-tracking, port 5000
#   BACKEND=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   ARTIFACTS=s3://YOUR_BUCKET/mlartifacts cluster/tracking-server.sh
#
# Then on every driver:  export MLFLOW_TRACKING_URI=http://THIS_HOST:5000
# (or `carclf sweep FILE --address auto --tracking-uri http://THIS_HOST:5000`).
#
# SQLite is fine for one server process on one host; it is the only writer, so trials never see
# `database is locked`. With many nodes and concurrent trials use PostgreSQL and more workers.
# Artifacts are proxied: clients upload to this server (mlflow-artifacts:/...), which writes them to
# ARTIFACTS, so nodes need no bucket credentials of their own; only this host does.
set -euo pipefail

HOST="${HOST:-0.0.0.0}"          # every interface: the other nodes must reach it
PORT="${PORT:-5000}"
STATE_DIR="${STATE_DIR:-$HOME/carclf-tracking}"
BACKEND="${BACKEND:-sqlite:///$STATE_DIR/mlflow.db}"     # absolute: four slashes in the URI
ARTIFACTS="${ARTIFACTS:-$STATE_DIR/mlartifacts}"         # a folder, or s3://, gs://, wasbs://...
case "$BACKEND" in
  sqlite:*) WORKERS="${WORKERS:-1}" ;;    # one process writing the file
  *)        WORKERS="${WORKERS:-4}" ;;
esac
# The Host headers clients send. MLflow's default (localhost and private IPs) refuses a DNS name;
# list every name and address the nodes and your browser use to reach this host.
NAME="$(hostname)"
ADDR="$(hostname -I 2>/dev/null | awk '{print $1}')"
ALLOWED_HOSTS="${ALLOWED_HOSTS:-$NAME,$NAME:$PORT,${ADDR:+$ADDR,$ADDR:$PORT,}localhost:$PORT,127.0.0.1:$PORT}"

mkdir -p "$STATE_DIR"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac

# The password of a database URI is shown as *** here, and reaches the server through its environment
# (MLFLOW_BACKEND_STORE_URI), not its command line, which every user of the host can list with `ps`.
SHOWN_BACKEND="$(printf '%s' "$BACKEND" | sed -E 's#^([^:/]+://[^:/@]*):[^@]*@#\1:***@#')"
echo "MLflow tracking server on http://$NAME:$PORT  (backend $SHOWN_BACKEND, artifacts $ARTIFACTS)" >&2
echo "WARNING: no authentication: anyone who reaches port $PORT can read and change every run and model" \
     "(see README.md, 'Who can reach what')" >&2
# The GenAI job runner starts consumer processes a training cluster does not use.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_BACKEND_STORE_URI="$BACKEND"
exec "${MLFLOW:-mlflow}" server \
  --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  --allowed-hosts "$ALLOWED_HOSTS"
