#!/usr/bin/env bash
# One command on a fresh machine: install everything, then run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick unit tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
scripts/gen_protos.sh --check
.venv/bin/python scripts/gen_topology_doc.py --check
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$rc"
