#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine (Debian 12, root), for the chaos suite:
#   1. installs docker.io and docker-compose (Compose v1) from Debian when dockerd or
#      docker-compose is missing;
#   2. starts dockerd in the background when `docker info` does not answer (log: $DOCKERD_LOG,
#      default /tmp/dockerd.log);
#   3. waits until `docker info` answers (at most $DOCKER_WAIT_S seconds, default 60).
# Idempotent: every step is skipped when already done. Exit 0 once the engine answers, 1 otherwise.
set -euo pipefail
DOCKERD_LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
DOCKER_WAIT_S=${DOCKER_WAIT_S:-60}

say() { echo "docker-engine: $*" >&2; }

if docker info >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1; then
  say "engine already answers"
  exit 0
fi

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    say "need ${need[*]} but not root: install them, or run as root"
    exit 1
  fi
  say "installing ${need[*]} from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  if [ -S /var/run/docker.sock ] && pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd runs but does not answer yet; waiting"
  else
    say "starting dockerd (log: $DOCKERD_LOG)"
    # setsid: the engine outlives this script and the shell (CI step) that started it.
    setsid dockerd >"$DOCKERD_LOG" 2>&1 < /dev/null &
  fi
  deadline=$(( $(date +%s) + DOCKER_WAIT_S ))
  until docker info >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "dockerd did not answer within ${DOCKER_WAIT_S}s; last lines of $DOCKERD_LOG:"
      tail -n 20 "$DOCKERD_LOG" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
fi
say "engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')), $(docker-compose version --short 2>/dev/null || echo 'no docker-compose')"
