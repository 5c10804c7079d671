#!/usr/bin/env bash
# Everything a fresh machine needs before `changeflow` runs: Debian packages for the native stack
# (PostgreSQL, Redis, a JDK and Maven for Kafka, Kafka Connect and the search engine), then a
# virtualenv with the project. Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15 postgresql-client-15)
command -v redis-server >/dev/null || need+=(redis-server)
command -v java >/dev/null || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
command -v psql >/dev/null || need+=(postgresql-client-15)
if ((${#need[@]})); then
  echo "bootstrap: installing Debian packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# Reinstalled when the dependencies or the C codec change (an editable install builds it in place).
stamp=.venv/.installed-$(cat pyproject.toml setup.py changeflow/schemas/_codec.c | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing changeflow and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
