#!/usr/bin/env bash
# Runs pgtasks' benchmarks and, when the peers' harness is present
# (../shared/peers next to the repository, or PEERS_DIR), the peers' benchmarks
# in the same run, then prints pgtasks/peer ratios.
#
# Usage: bench/compare.sh [--quick] [--no-peers]
#   --quick     small sizes on both sides (a few minutes in all)
#   --no-peers  pgtasks only
# Env: PGTASKS_BENCH_ADMIN_URL (default postgres://postgres@127.0.0.1:5432/postgres),
#      PEERS_DIR (default ../shared/peers), PGPASSWORD for the peers (default postgres).
# Writes every JSON line to target/bench/<UTC stamp>.jsonl and the peers' logs to
# target/bench/<stamp>.log; prints the ratio table (markdown) at the end.
#
# The peers' folder may be read-only: it is copied to a temporary directory,
# where its one-time setup runs (npm ci; a Python venv for procrastinate). A
# peer whose setup fails is skipped and named. Databases the peers need
# (peers, peers_*) are created when missing and those created are dropped after.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)

QUICK=""
RUN_PEERS=1
for arg in "$@"; do
    case $arg in
        --quick) QUICK=--quick ;;
        --no-peers) RUN_PEERS=0 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

ADMIN=${PGTASKS_BENCH_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
PEERS_SRC=${PEERS_DIR:-$ROOT/../shared/peers}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p target/bench
OUT=$ROOT/target/bench/$STAMP.jsonl
LOG=$ROOT/target/bench/$STAMP.log
: >"$OUT"
note() { printf '\n== %s\n' "$*" >&2; }
SKIPPED=()

# The HTTP figures (ours and the seed app's) need wrk: install it where apt can.
if ! command -v wrk >/dev/null && command -v apt-get >/dev/null; then
    note "installing wrk"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q wrk >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1; } \
        || echo "could not install wrk: the HTTP figures will be skipped" >&2
fi

note "building"
cargo build --release --quiet --bin pgtasks --bin pgtasks-bench || exit 1
BENCH=$ROOT/target/release/pgtasks-bench

note "pgtasks ${QUICK:-full sizes} -> $OUT"
# shellcheck disable=SC2086
if ! "$BENCH" $QUICK all | tee -a "$OUT"; then
    SKIPPED+=("pgtasks: a benchmark failed (see above); the figures before it are kept")
fi

if [ "$RUN_PEERS" = 1 ] && [ -d "$PEERS_SRC" ]; then
    if [ -n "$QUICK" ]; then N=5000; LAT_N=100; HTTP_S=5; BASE_S=3; else N=20000; LAT_N=500; HTTP_S=15; BASE_S=10; fi
    WORK=$(mktemp -d /tmp/pgtasks-peers.XXXXXX)
    cp -r "$PEERS_SRC" "$WORK/peers" && chmod -R u+w "$WORK/peers"
    cd "$WORK/peers" || exit 1
    export PGPASSWORD=${PGPASSWORD:-postgres}

    CREATED=()
    for db in peers peers_pgboss peers_seed peers_graphile peers_procrastinate; do
        if [ "$(psql -X -Atq "$ADMIN" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
            psql -X -q "$ADMIN" -c "CREATE DATABASE $db" && CREATED+=("$db")
        fi
    done

    note "peers: setup in $WORK/peers (log: $LOG)"
    NODE_OK=0
    if command -v node >/dev/null && command -v npm >/dev/null; then
        npm ci --no-audit --no-fund --loglevel=error >>"$LOG" 2>&1 && NODE_OK=1
    fi
    PY_OK=0
    python3 -m venv .venv >>"$LOG" 2>&1 \
        && .venv/bin/pip install -q -r bench/requirements.txt >>"$LOG" 2>&1 && PY_OK=1

    r() { echo "+ $*" >&2; timeout 900 "$@" 2>>"$LOG" | tee -a "$OUT"; }
    if command -v pgbench >/dev/null; then
        r bench/pg_baseline.sh "$BASE_S"
    else
        SKIPPED+=("PostgreSQL reference: pgbench is missing")
    fi
    if [ "$NODE_OK" = 1 ]; then
        r node bench/graphile.mjs latency --n="$LAT_N"
        r node bench/pgboss.mjs latency --notify --n="$LAT_N"
        r node bench/pgboss.mjs throughput --n="$N" --conc=8 --batch=100 --workers=4 --polling=0.5 --burst --analyze
        r node bench/graphile.mjs throughput --n="$N" --conc=8 --concurrency=10 --analyze
        r node bench/graphile.mjs throughput --n="$N" --conc=8 --concurrency=10 --local-queue=100 --skip-batch --analyze
        if command -v wrk >/dev/null; then
            r bench/seed_http.sh "$HTTP_S" 32 2
        else
            SKIPPED+=("seed app: wrk is missing")
        fi
    else
        SKIPPED+=("pg-boss, graphile-worker, seed app: node/npm missing or npm ci failed (see $LOG)")
    fi
    if [ "$PY_OK" = 1 ]; then
        r .venv/bin/python bench/procrastinate_bench.py latency --n="$LAT_N"
        r .venv/bin/python bench/procrastinate_bench.py throughput --n="$N" --conc=8 --concurrency=10 --analyze
    else
        SKIPPED+=("procrastinate: the Python venv could not be set up (see $LOG)")
    fi

    for db in "${CREATED[@]}"; do
        psql -X -q "$ADMIN" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
    done
    cd "$ROOT" || exit 1
    rm -rf "$WORK"
elif [ "$RUN_PEERS" = 1 ]; then
    SKIPPED+=("peers: $PEERS_SRC not found")
fi

note "pgtasks / peer ($OUT)"
"$BENCH" compare "$OUT"
if [ ${#SKIPPED[@]} -gt 0 ]; then
    echo
    echo "Skipped:"
    printf -- '- %s\n' "${SKIPPED[@]}"
fi
