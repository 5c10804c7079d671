#!/usr/bin/env bash
# The real Docker Compose, for checking docker-compose.yml on machines without it.
#
#   changeflow/deploy/compose_check.sh            # = config: `docker compose config --quiet` on the repo's file
#   changeflow/deploy/compose_check.sh config ARGS...   # `docker compose -f docker-compose.yml config ARGS...`
#   changeflow/deploy/compose_check.sh compose ARGS...  # `docker compose -f docker-compose.yml ARGS...`
#                                            #   (e.g. compose --env-file FILE config --format json)
#   changeflow/deploy/compose_check.sh path       # print the path of the docker-compose binary (building it)
#   changeflow/deploy/compose_check.sh plugin     # also link it as ${DOCKER_CONFIG:-~/.docker}/cli-plugins/docker-compose
#
# Docker Compose v2 is a Go program; its module comes from the Go module proxy (checked against the
# Go checksum database) and is built with the machine's Go. The module's go.mod has `exclude`
# directives, which `go install pkg@version` refuses, so the module is downloaded and built in a
# scratch copy instead. Cold, on 2 cores, that takes about 2 minutes; afterwards the binary is cached
# under .changeflow/tools/ (or $CHANGEFLOW_STATE_DIR/tools) and reused. Idempotent and safe to run
# concurrently (flock).
#
# `config` parses, interpolates and validates the file against the Compose specification exactly as
# `docker compose up` would; it needs no Docker engine. The `docker` client is used when present
# (plugin mode, with a private DOCKER_CONFIG so the user's own is untouched), else the binary runs
# standalone; both parse identically.
set -Eeuo pipefail

# Last release of the v2 module line (needs Go >= 1.24.9); the v5 line needs a newer Go than 1.26.8.
COMPOSE_VERSION="${CHANGEFLOW_COMPOSE_VERSION:-v2.40.3}"
COMPOSE_MODULE="github.com/docker/compose/v2"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
state="${CHANGEFLOW_STATE_DIR:-.changeflow}"
case "$state" in /*) ;; *) state="$repo/$state" ;; esac
tools="$state/tools"
bin_dir="$tools/docker-compose-$COMPOSE_VERSION"
bin="$bin_dir/docker-compose"
docker_config="$tools/docker-config"   # DOCKER_CONFIG with only the plugin in it

log() { echo "compose_check: $*" >&2; }

scratch=""
trap '[ -z "$scratch" ] || rm -rf "$scratch"' EXIT

build() {
    command -v go >/dev/null || { log "Go is needed to build Docker Compose (the Go toolchain, 1.24 or newer)"; exit 1; }
    local src start
    start=$(date +%s)
    log "building Docker Compose $COMPOSE_VERSION from the Go module proxy (about 2 min cold) ..."
    # -mod=mod lets the build resolve go.sum entries it lacks; GOTOOLCHAIN=local: never fetch a Go.
    export GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=local CGO_ENABLED=0
    local build_log="$tools/docker-compose-build.log"
    # `go mod download -json` names the module's directory in the module cache (read-only there).
    src="$(go mod download -json "$COMPOSE_MODULE@$COMPOSE_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
    [ -d "$src" ] || { log "go mod download gave no directory for $COMPOSE_MODULE@$COMPOSE_VERSION"; exit 1; }
    scratch="$(mktemp -d)"
    cp -R "$src/." "$scratch/"
    chmod -R u+w "$scratch"
    mkdir -p "$bin_dir"
    if ! (cd "$scratch" && go build -trimpath \
            -ldflags "-s -w -X $COMPOSE_MODULE/internal.Version=$COMPOSE_VERSION" \
            -o "$bin.tmp" ./cmd) >"$build_log" 2>&1; then
        tail -n 40 "$build_log" >&2
        log "build failed; full log: $build_log"
        exit 1
    fi
    mv -f "$bin.tmp" "$bin"
    log "built $bin in $(( $(date +%s) - start ))s"
}

ensure() {
    if [ ! -x "$bin" ]; then
        mkdir -p "$tools"
        if command -v flock >/dev/null; then
            exec 9>"$tools/.docker-compose.lock"
            flock 9
        fi
        [ -x "$bin" ] || build
    fi
    mkdir -p "$docker_config/cli-plugins"
    ln -sfn "$bin" "$docker_config/cli-plugins/docker-compose"
}

compose() {
    if command -v docker >/dev/null; then
        DOCKER_CONFIG="$docker_config" docker compose "$@"
    else
        "$bin" "$@"
    fi
}

cmd="${1:-config}"
[ $# -gt 0 ] && shift
case "$cmd" in
    path)
        ensure
        echo "$bin"
        ;;
    plugin)
        ensure
        target="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-compose"
        if [ -e "$target" ] && [ "$(readlink -f "$target")" != "$(readlink -f "$bin")" ]; then
            log "$target exists already; left as it is"
        else
            mkdir -p "$(dirname "$target")"
            ln -sfn "$bin" "$target"
            log "linked $target -> $bin"
        fi
        ;;
    config)
        ensure
        [ $# -gt 0 ] || set -- --quiet
        compose --project-directory "$repo" -f "$repo/docker-compose.yml" config "$@"
        ;;
    compose)
        ensure
        compose --project-directory "$repo" -f "$repo/docker-compose.yml" "$@"
        ;;
    *)
        echo "usage: $0 [config [ARGS...] | compose ARGS... | path | plugin]" >&2
        exit 2
        ;;
esac
