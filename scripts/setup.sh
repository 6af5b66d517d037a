#!/usr/bin/env bash
# Installs everything geotrain needs on a fresh Debian 12 machine (root): the etcd server from
# Debian, and a Python virtual environment in .venv with geotrain installed in editable mode.
# Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GEOTRAIN_PYTHON:-python3}

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server etcd-client)
if [ "${GEOTRAIN_WITH_DOCKER:-0}" = 1 ]; then
  command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
  command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} from Debian" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # Debian's package starts an etcd service on install where systemd runs; geotrain starts its own.
  (systemctl stop etcd 2>/dev/null || true)
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
# torch is pinned to the CPU build that lies on disk here (see docs/dependencies.md).
.venv/bin/pip install -q -e '.[dev]'
echo "setup: done (.venv/bin/geotrain)" >&2
