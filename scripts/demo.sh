#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the two-site demo end to end.
# Extra arguments go to `geotrain launch` (e.g. --set training.rounds=20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/geotrain launch topologies/demo.yaml "$@"
