#!/usr/bin/env bash
# Smoke test of the container image, on a machine without an image registry.
#
#   1. a Docker engine: uses the one that answers, or installs docker.io and
#      starts dockerd (vfs storage, no iptables, no bridge; log in $CACHE);
#   2. the Dockerfile's base images: where absent, local stand-ins are made
#      from a debootstrap'd Debian bookworm (cached as a tarball in $CACHE) and
#      tagged with the exact names the Dockerfile defaults to; the Rust one gets
#      this machine's toolchain, gcc, libc6-dev and pkg-config;
#   3. builds the image with the real docker/Dockerfile (classic builder,
#      --network host: the build stage fetches crates from the registry);
#   4. runs it with --network host against the PostgreSQL on 127.0.0.1:5432, in
#      a scratch database that is dropped afterwards;
#   5. checks /health, Docker's HEALTHCHECK, a job submitted over HTTP (and one
#      inserted with SQL) reaching `completed`, and a clean exit 0 on SIGTERM
#      within `docker stop -t 30`; then the split deployment: an `api`
#      container (on SMOKE_PORT + 1) takes a job that a `worker` container runs;
#      a command-handler job that leaves a process behind shows whether zombies
#      collect: reported for the binary as PID 1, a failure under --init (which
#      the compose file uses);
#   6. prints the image size, the build time and a summary of every step.
#
# Environment: SMOKE_PORT (3901), SMOKE_IMAGE (pgtasks:smoke),
# SMOKE_ADMIN_URL (postgres://postgres@127.0.0.1:5432/postgres),
# SMOKE_CACHE (/var/cache/pgtasks-smoke), SMOKE_NO_CACHE=1 to build without
# Docker's layer cache. All traffic stays on 127.0.0.1. Needs root (dockerd,
# debootstrap).
#
# The dockerd this script starts is left running for the next run; stop it
# with: kill "$(cat /var/run/docker.pid)".
# Small helpers are defined inside the steps and called through wait_for.
# shellcheck disable=SC2317
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${SMOKE_PORT:-3901}
IMAGE=${SMOKE_IMAGE:-pgtasks:smoke}
ADMIN_URL=${SMOKE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
CACHE=${SMOKE_CACHE:-/var/cache/pgtasks-smoke}
DB=pgtasks_smoke
CONTAINER=pgtasks-smoke
API_PORT=$((PORT + 1))
# A command-handler queue whose program leaves a process behind: once the
# program exits its group is killed, and the orphan is re-parented to PID 1.
CMD_QUEUE=smoke_cmd
CMD_ENV=(
    -e PGTASKS_QUEUES__SMOKE_CMD__HANDLER__KIND=command
    -e PGTASKS_QUEUES__SMOKE_CMD__HANDLER__PROGRAM=sh
    -e 'PGTASKS_QUEUES__SMOKE_CMD__HANDLER__ARGS=["-c", "sleep 60 & echo {}"]'
)
DB_URL=${ADMIN_URL%/*}/$DB
STANDIN_LABEL=org.pgtasks.smoke.standin

mkdir -p "$CACHE"

# ---------------------------------------------------------------- reporting
declare -a RESULTS=()
FAILED=0
# Steps run in subshells (so `set -e` applies inside them); what they need to
# hand on goes through files here.
STATE=$(mktemp -d)
state_set() { printf '%s\n' "$2" >"$STATE/$1"; }
state_get() { cat "$STATE/$1" 2>/dev/null || true; }

log() { printf '\n== %s\n' "$*"; }
info() { printf '   %s\n' "$*"; }
record() { RESULTS+=("$(printf '%-4s %s' "$1" "$2")"); }

# Runs one step: `step NAME FUNCTION`. A failed step is recorded and the run
# goes on with the independent checks; `fatal_step` stops the run instead.
step() {
    local name=$1 rc=0
    shift
    log "$name"
    set +e
    (
        set -e
        "$@"
    )
    rc=$?
    set -e
    if ((rc == 0)); then
        record ok "$name"
    else
        record FAIL "$name"
        FAILED=1
        printf '   FAILED: %s\n' "$name" >&2
        return 1
    fi
}
fatal_step() {
    local name=$1
    step "$@" || {
        printf '\nsmoke: stopping: step "%s" failed\n' "$name" >&2
        exit 1
    }
}

summary() {
    log "summary"
    local r size build
    size=$(state_get image_size)
    build=$(state_get build_seconds)
    [[ -z $size ]] || info "image $IMAGE: $size"
    [[ -z $build ]] || info "build time: ${build}s${SMOKE_NO_CACHE:+ (without layer cache)}"
    for r in "${RESULTS[@]}"; do info "$r"; done
    if ((FAILED)); then
        info "RESULT: FAILED"
    else
        info "RESULT: all steps passed"
    fi
}

cleanup() {
    local status=$? c
    for c in "$CONTAINER" "$CONTAINER-api" "$CONTAINER-worker"; do
        docker inspect "$c" >/dev/null 2>&1 || continue
        if ((FAILED)) || ((status != 0)); then
            log "$c log (last 40 lines)"
            docker logs --tail 40 "$c" 2>&1 | sed 's/^/   /' || true
        fi
        docker rm -f "$c" >/dev/null 2>&1 || true
    done
    if [[ $(state_get db_created) == 1 ]]; then
        if psql -X -q -d "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1; then
            info "dropped database $DB"
        else
            info "could not drop database $DB"
        fi
    fi
    summary
    rm -rf "$STATE"
    if ((status == 0 && FAILED)); then status=1; fi
    exit "$status"
}
trap cleanup EXIT

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Polls `CMD...` until it succeeds or SECONDS pass: `wait_for SECONDS CMD...`.
# A command returning 99 gives up at once.
wait_for() {
    local deadline=$((SECONDS + $1)) rc
    shift
    while :; do
        rc=0
        "$@" || rc=$?
        ((rc == 0)) && return 0
        ((rc == 99)) && return 99
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# ---------------------------------------------------------------- 1. engine
docker_answers() { docker info >/dev/null 2>&1; }

ensure_docker() {
    if docker_answers; then
        info "using the running engine ($(docker version -f '{{.Server.Version}}'))"
        return 0
    fi
    if ! command -v dockerd >/dev/null; then
        info "installing docker.io"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        apt-get install -y -q docker.io >/dev/null
    fi
    info "starting dockerd (log: $CACHE/dockerd.log)"
    # Niced: image builds run under it and others may be compiling here.
    nohup nice -n 10 dockerd --storage-driver=vfs --iptables=false --bridge=none \
        >"$CACHE/dockerd.log" 2>&1 &
    if ! wait_for 60 docker_answers; then
        tail -n 20 "$CACHE/dockerd.log" >&2
        return 1
    fi
    info "dockerd $(docker version -f '{{.Server.Version}}') is up"
}

# ---------------------------------------------------------------- 2. base images
dockerfile_default() {
    sed -n "s/^ARG $1=//p" docker/Dockerfile | head -n 1
}

debian_mirror() {
    local m=
    if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        m=$(awk '/^URIs:/ && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $m && -f /etc/apt/sources.list ]]; then
        m=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    [[ -n $m ]] || { echo "no Debian mirror found in the apt sources" >&2; return 1; }
    echo "$m"
}

# Writes a bookworm minbase root filesystem tarball ($1) with extra packages ($2,
# comma-separated, may be empty), unless it is already cached.
rootfs_tarball() {
    local tarball=$1 include=$2 dir mirror
    if [[ -s $tarball ]]; then
        info "cached root filesystem: $tarball"
        return 0
    fi
    command -v debootstrap >/dev/null || {
        info "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
    }
    mirror=$(debian_mirror)
    dir=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    chmod 0755 "$dir" # becomes the image's /: mktemp's 0700 locks out non-root users
    info "debootstrap --variant=minbase ${include:+--include=$include }bookworm ($mirror)"
    if ! debootstrap --variant=minbase ${include:+--include="$include"} \
        bookworm "$dir" "$mirror" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        rm -rf "$dir"
        return 1
    fi
    # Like the slim images: no package lists, caches or docs.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
    tar -C "$dir" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
    info "cached $(du -h "$tarball" | cut -f1) in $tarball"
}

is_standin() {
    [[ $(docker image inspect -f "{{index .Config.Labels \"$STANDIN_LABEL\"}}" "$1" 2>/dev/null) == true ]]
}

describe_image() {
    if is_standin "$1"; then echo "$1 (local stand-in)"; else echo "$1"; fi
}

ensure_runtime_image() {
    local name=$1
    if docker image inspect "$name" >/dev/null 2>&1; then
        info "present: $(describe_image "$name")"
        return 0
    fi
    rootfs_tarball "$CACHE/bookworm-minbase.tar" ""
    docker import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "LABEL $STANDIN_LABEL=true" \
        --change 'CMD ["bash"]' \
        - "$name" <"$CACHE/bookworm-minbase.tar" >/dev/null
    info "imported stand-in $name"
}

ensure_rust_image() {
    local name=$1 sysroot toolchain dir
    if docker image inspect "$name" >/dev/null 2>&1; then
        info "present: $(describe_image "$name")"
        return 0
    fi
    rootfs_tarball "$CACHE/bookworm-minbase-build.tar" "gcc,libc6-dev,pkg-config,ca-certificates"
    sysroot=$(rustc --print sysroot) || { echo "no Rust toolchain on this machine" >&2; return 1; }
    toolchain=$(basename "$sysroot")
    dir=$(mktemp -d "$CACHE/rustimg.XXXXXX")
    chmod 0755 "$dir"
    tar -C "$dir" -xf "$CACHE/bookworm-minbase-build.tar"
    # The layout of the upstream image: toolchains under RUSTUP_HOME, the
    # commands on PATH in CARGO_HOME/bin.
    mkdir -p "$dir/usr/local/rustup/toolchains/$toolchain" "$dir/usr/local/cargo/bin"
    tar -C "$sysroot" --exclude=./share/doc -cf - . \
        | tar -C "$dir/usr/local/rustup/toolchains/$toolchain" -xf -
    local bin
    for bin in "$dir/usr/local/rustup/toolchains/$toolchain"/bin/*; do
        ln -s "/usr/local/rustup/toolchains/$toolchain/bin/$(basename "$bin")" \
            "$dir/usr/local/cargo/bin/$(basename "$bin")"
    done
    # Trust what this machine trusts: its outbound HTTPS may go through a proxy
    # with its own certificate authority.
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
    chmod -R a+rX "$dir/usr/local/rustup" "$dir/usr/local/cargo"
    info "importing $name ($(rustc --version), $(du -sh "$dir" | cut -f1))"
    tar -C "$dir" -cf - . | docker import \
        --change "ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change "ENV CARGO_HOME=/usr/local/cargo" \
        --change "ENV RUSTUP_HOME=/usr/local/rustup" \
        --change "LABEL $STANDIN_LABEL=true" \
        --change 'CMD ["bash"]' \
        - "$name" >/dev/null
    rm -rf "$dir"
    docker run --rm --network host "$name" sh -c 'cargo --version && cc --version | head -n 1' \
        | sed 's/^/   /'
}

ensure_base_images() {
    local rust runtime
    rust=$(dockerfile_default RUST_IMAGE)
    runtime=$(dockerfile_default RUNTIME_IMAGE)
    [[ -n $rust && -n $runtime ]] || { echo "no ARG defaults in docker/Dockerfile" >&2; return 1; }
    ensure_runtime_image "$runtime"
    ensure_rust_image "$rust"
}

# ---------------------------------------------------------------- 3. build
# The classic builder leaves a multi-stage build's build stage untagged, so a
# prune would drop its layer cache while every rebuild leaves a stale copy
# behind (on vfs, a full copy per layer). So: the build stage is built and
# tagged first ($IMAGE-build), then the image; afterwards the images these two
# tags pointed to before are removed, with their untagged layers.
build_image() {
    local start=$SECONDS old_ids new_ids id target tag
    old_ids=$(docker image inspect -f '{{.Id}}' "$IMAGE-build" "$IMAGE" 2>/dev/null || true)
    local -a flags=(--network host -f docker/Dockerfile)
    [[ -n ${SMOKE_NO_CACHE:-} ]] && flags+=(--no-cache)
    : >"$CACHE/build.log"
    for target in build runtime; do
        tag=$IMAGE
        [[ $target == build ]] && tag=$IMAGE-build
        info "DOCKER_BUILDKIT=0 docker build ${flags[*]} --target $target -t $tag .  (log: $CACHE/build.log)"
        if ! DOCKER_BUILDKIT=0 docker build "${flags[@]}" --target "$target" -t "$tag" . >>"$CACHE/build.log" 2>&1; then
            tail -n 40 "$CACHE/build.log" >&2
            return 1
        fi
    done
    state_set build_seconds $((SECONDS - start))
    info "built in $((SECONDS - start))s ($(grep -c 'Using cache' "$CACHE/build.log" || true) of $(grep -c '^Step ' "$CACHE/build.log" || true) steps cached)"
    new_ids=$(docker image inspect -f '{{.Id}}' "$IMAGE-build" "$IMAGE")
    for id in $old_ids; do
        grep -qx "$id" <<<"$new_ids" && continue
        if docker rmi "$id" >/dev/null 2>&1; then
            info "removed the previous build's image ${id:7:12}"
        fi
    done
}

inspect_image() {
    local bytes size user entrypoint cmd health stop
    bytes=$(docker image inspect -f '{{.Size}}' "$IMAGE")
    size=$(awk -v b="$bytes" 'BEGIN { printf "%.1f MB (%d bytes)", b / 1e6, b }')
    state_set image_size "$size"
    user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
    entrypoint=$(docker image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")
    cmd=$(docker image inspect -f '{{json .Config.Cmd}}' "$IMAGE")
    health=$(docker image inspect -f '{{json .Config.Healthcheck.Test}}' "$IMAGE")
    stop=$(docker image inspect -f '{{.Config.StopSignal}}' "$IMAGE")
    info "size $size; user $user; entrypoint $entrypoint cmd $cmd"
    info "healthcheck $health; stop signal $stop"
    [[ -n $user && $user != root && $user != 0 && $user != 0:* ]] || { echo "image runs as root" >&2; return 1; }
    [[ $stop == SIGTERM ]] || { echo "stop signal is not SIGTERM" >&2; return 1; }
    info "$(docker run --rm --network host "$IMAGE" --version)"
    info "files: $(docker run --rm --network host --entrypoint ls "$IMAGE" -A /app /app/config | tr '\n' ' ')"
    docker run --rm --network host --entrypoint id "$IMAGE" | sed 's/^/   /'
}

# ---------------------------------------------------------------- 4. database
ensure_postgres() {
    if pg_isready -q -h 127.0.0.1 -p 5432; then return 0; fi
    local version
    version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
    [[ -n $version ]] || { echo "no PostgreSQL on 127.0.0.1:5432" >&2; return 1; }
    info "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for 60 pg_isready -q -h 127.0.0.1 -p 5432
}

create_database() {
    ensure_postgres
    PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d "$ADMIN_URL" \
        -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
    state_set db_created 1
    info "created $DB_URL"
}

sql() { psql -X -q -At -v ON_ERROR_STOP=1 -d "$DB_URL" "$@"; }

# ---------------------------------------------------------------- 5. run
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_container() {
    local p
    for p in "$PORT" "$API_PORT"; do
        port_free "$p" || { echo "something already listens on 127.0.0.1:$p (set SMOKE_PORT)" >&2; return 1; }
    done
    docker rm -f "$CONTAINER" "$CONTAINER-api" "$CONTAINER-worker" >/dev/null 2>&1 || true
    # --health-interval only shortens the wait; the check command is the image's.
    docker run -d --name "$CONTAINER" --network host \
        --health-interval 2s \
        -e DATABASE_URL="$DB_URL" \
        -e PORT="$PORT" \
        -e PGTASKS_WORKER__SHUTDOWN_GRACE=5s \
        "${CMD_ENV[@]}" \
        "$IMAGE" serve >/dev/null
    schema_ready() {
        [[ $(docker inspect -f '{{.State.Running}}' "$CONTAINER") == true ]] || {
            echo "container exited with $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")" >&2
            return 99
        }
        [[ $(sql -c "SELECT to_regclass('pgtasks.job') IS NOT NULL" 2>/dev/null) == t ]]
    }
    local rc=0
    wait_for 60 schema_ready || rc=$?
    ((rc == 0)) || { ((rc == 99)) || echo "pgtasks.job not created within 60s" >&2; return 1; }
    info "running; schema applied by the container ($(sql -c 'SELECT max(version) FROM pgtasks.schema_version'))"
}

job_state() { sql -v id="$1" <<<"SELECT state FROM pgtasks.job WHERE id::text = :'id'"; }

# Waits for job $1 to be completed: `wait_completed ID SECONDS`.
wait_completed() {
    local id=$1 state start
    start=$(now_ms)
    completed() { state=$(job_state "$id"); [[ $state == completed ]]; }
    if wait_for "$2" completed; then
        info "job $id completed (seen by polling psql within $(($(now_ms) - start)) ms)"
    else
        echo "job $id is '${state:-missing}' after $2s" >&2
        return 1
    fi
}

sql_job() {
    local queue=${1:-readme-queue} id
    id=$(sql -v queue="$queue" <<<"INSERT INTO pgtasks.job (queue, data) VALUES (:'queue', '{\"arg1\":\"read me (sql)\"}') RETURNING id" | head -n 1)
    info "inserted job $id into $queue with SQL"
    wait_completed "$id" 30
}

zombies() {
    docker exec "$1" sh -c 'grep -l "^State:[[:space:]]*Z" /proc/[0-9]*/status 2>/dev/null | wc -l'
}

# Runs a job of $CMD_QUEUE in container $1 and prints how many zombies it holds
# a moment later; `expect_none` makes any zombie a failure.
command_job_zombies() {
    local c=$1 expect=${2:-} n=0
    sql_job "$CMD_QUEUE"
    some() { n=$(zombies "$c"); ((n > 0)); }
    wait_for 3 some || true
    info "zombie processes in $c after a command job left one behind: $n"
    if [[ $expect == expect_none ]] && ((n > 0)); then
        echo "zombies under --init: nothing reaps" >&2
        return 1
    fi
}

health_endpoint() {
    local port=${1:-$PORT} body=
    ok() { body=$(curl -fsS -m 2 "http://127.0.0.1:$port/health" 2>/dev/null); }
    if ! wait_for 30 ok; then
        echo "GET http://127.0.0.1:$port/health did not answer 200 within 30s" >&2
        return 1
    fi
    info "GET /health -> $body"
    [[ $(tr -d ' \n' <<<"$body") == '{"status":"ok"}' ]] || { echo "unexpected body" >&2; return 1; }
}

docker_health() {
    local status=
    healthy() {
        status=$(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER")
        [[ $status == healthy ]]
    }
    if wait_for 45 healthy; then
        info "docker reports the container healthy"
    else
        echo "docker health status is '$status'; last check:" >&2
        docker inspect -f '{{range .State.Health.Log}}exit {{.ExitCode}}: {{.Output}}{{"\n"}}{{end}}' "$CONTAINER" \
            | grep -v '^$' | tail -n 2 | sed 's/^/   /' >&2
        return 1
    fi
}

# Submits a job over HTTP to port $1 (default $PORT) and waits for it; the id
# is left in $STATE/http_job_id.
http_job() {
    local port=${1:-$PORT} response id
    response=$(curl -sS -m 5 -X POST -H 'Content-Type: application/json' \
        -d '{"arg1":"read me"}' "http://127.0.0.1:$port/api/jobs/readme" -w '\n%{http_code}') || {
        echo "POST /api/jobs/readme: no answer" >&2
        return 1
    }
    info "POST /api/jobs/readme -> ${response//$'\n'/ (HTTP }) "
    [[ ${response##*$'\n'} == 2* ]] || { echo "POST /api/jobs/readme did not succeed" >&2; return 1; }
    id=$(sed -n 's/.*"jobId" *: *"\([^"]*\)".*/\1/p' <<<"$response" | head -n 1)
    [[ -n $id && $response == *'"success":true'* && $response == *'"queue":"readme-queue"'* ]] \
        || { echo "unexpected response body" >&2; return 1; }
    state_set http_job_id "$id"
    wait_completed "$id" 30
}

stop_container() {
    local c=${1:-$CONTAINER} start elapsed code
    start=$(now_ms)
    docker stop -t 30 "$c" >/dev/null
    elapsed=$(($(now_ms) - start))
    code=$(docker inspect -f '{{.State.ExitCode}}' "$c")
    info "docker stop -t 30 $c: exited with $code after $elapsed ms"
    docker logs --tail 4 "$c" 2>&1 | sed 's/^/   | /'
    [[ $code == 0 ]] || { echo "exit code $code (137 would mean SIGKILL after the timeout)" >&2; return 1; }
    ((elapsed < 30000)) || { echo "took the whole timeout" >&2; return 1; }
}

# The split deployment: `pgtasks api` takes the job, `pgtasks worker` runs it.
split_mode() {
    # As in the compose file: --init, and no health check for the worker.
    docker run -d --name "$CONTAINER-worker" --network host --init --no-healthcheck \
        -e DATABASE_URL="$DB_URL" "${CMD_ENV[@]}" "$IMAGE" worker >/dev/null
    docker run -d --name "$CONTAINER-api" --network host --init --health-interval 2s \
        -e DATABASE_URL="$DB_URL" -e PORT="$API_PORT" "$IMAGE" api >/dev/null
    health_endpoint "$API_PORT"
    http_job "$API_PORT"
    local id
    id=$(state_get http_job_id)
    docker logs "$CONTAINER-worker" 2>&1 | grep -q "job_id=$id " \
        || { echo "job $id was not run by the worker container" >&2; return 1; }
    info "job $id was run by $CONTAINER-worker"
    if docker logs "$CONTAINER-api" 2>&1 | grep -q "processing readme job"; then
        echo "the api container ran a job" >&2
        return 1
    fi
    command_job_zombies "$CONTAINER-worker" expect_none
    stop_container "$CONTAINER-api"
    stop_container "$CONTAINER-worker"
}

# ---------------------------------------------------------------- run
fatal_step "docker engine" ensure_docker
fatal_step "base images (Dockerfile defaults; stand-ins where absent)" ensure_base_images
fatal_step "build $IMAGE with docker/Dockerfile" build_image
fatal_step "image: size, non-root user, entrypoint, healthcheck, files" inspect_image
fatal_step "scratch database $DB" create_database
fatal_step "container running 'pgtasks serve' (--network host, PORT=$PORT)" start_container
step "job inserted with SQL reaches completed" sql_job || true
step "GET /health answers {\"status\":\"ok\"}" health_endpoint || true
step "Docker HEALTHCHECK (pgtasks healthcheck) reports healthy" docker_health || true
step "POST /api/jobs/readme job reaches completed" http_job || true
step "command job with the binary as PID 1 (zombies reported, not judged)" command_job_zombies "$CONTAINER" || true
step "SIGTERM: docker stop -t 30 exits 0 in time" stop_container || true
step "split (--init, as compose): 'pgtasks api' (PORT=$API_PORT) takes a job, 'pgtasks worker' runs it and a command job without leaving zombies; both stop with 0" split_mode || true
