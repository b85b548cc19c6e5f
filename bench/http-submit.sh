#!/usr/bin/env bash
# HTTP submit benchmark: starts `pgtasks serve` (release build) on a scratch
# database, runs wrk against POST /api/jobs/readme, then checks that every
# acknowledged request has its row. Prints JSON lines.
#
# Usage: bench/http-submit.sh [duration_s=15] [connections=32] [threads=2]
# Env: PGTASKS_BENCH_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres),
#      BENCH_PORT (default 3921), RUST_LOG (default info, as deployed).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-15}; CONN=${2:-32}; THREADS=${3:-2}
ADMIN=${PGTASKS_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=pgtasks_bench_http
PORT=${BENCH_PORT:-3921}
URL="${ADMIN%/*}/$DB"
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet
psql -X -q "$ADMIN" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
LOG=$(mktemp /tmp/pgtasks-bench.XXXX.log)
DATABASE_URL=$URL PORT=$PORT RUST_LOG=${RUST_LOG:-info} ./target/release/pgtasks serve >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    ./target/release/pgtasks healthcheck --url "http://127.0.0.1:$PORT" >/dev/null 2>&1 && break
    sleep 0.1
done
sleep 3
rss_mib() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$PID/status"; }
RSS_IDLE=$(rss_mib)
OUT=$(wrk -t"$THREADS" -c"$CONN" -d"${DUR}s" --latency -s bench/submit.lua "http://127.0.0.1:$PORT")
RSS_LOADED=$(rss_mib)
LINE=$(echo "$OUT" | grep '^{"metric":"http_submit"')
ACKED=$(echo "$LINE" | sed -E 's/.*"acknowledged":([0-9]+).*/\1/')
ROWS=$(psql -X -Atq "$URL" -c "SELECT count(*) FROM pgtasks.job WHERE queue = 'readme-queue'")
echo "${LINE%\}},\"wrk\":\"-t$THREADS -c$CONN -d${DUR}s\"}"
echo "{\"metric\":\"http_submit_rows\",\"acknowledged\":$ACKED,\"rows\":$ROWS,\"every_ack_has_its_row\":$([ "$ROWS" -ge "$ACKED" ] && echo true || echo false)}"
echo "{\"metric\":\"rss\",\"idle_mib\":$RSS_IDLE,\"after_load_mib\":$RSS_LOADED}"
kill -TERM $PID; wait $PID || true
psql -X -q "$ADMIN" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
[ "$ROWS" -ge "$ACKED" ]
