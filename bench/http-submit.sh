#!/usr/bin/env bash
# HTTP submit benchmark: `pgtasks serve` (release build) on a scratch database,
# wrk against POST /api/jobs/readme (bench/submit.lua), resident memory idle and
# after the load, and the check that every acknowledged request has its row.
# Prints JSON lines; the work is done by `pgtasks-bench http`.
#
# Usage: bench/http-submit.sh [duration_s=15] [connections=32] [threads=2]
# Env: PGTASKS_BENCH_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres),
#      RUST_LOG (default info, as deployed).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
DUR=${1:-15}; CONN=${2:-32}; THREADS=${3:-2}
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
cargo build --release --quiet --bin pgtasks --bin pgtasks-bench
exec ./target/release/pgtasks-bench http --duration "$DUR" --connections "$CONN" --threads "$THREADS"
