#!/usr/bin/env bash
# Regenerates geotrain/_proto/ from protos/ (needs grpcio-tools from the dev extra).
# `scripts/gen_protos.sh --check` fails if the committed output is not what the .proto files give.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
"$PY" -m grpc_tools.protoc -I protos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/geotrain/v1/*.proto
mkdir -p "$out/final"
for f in "$out"/geotrain/v1/*.py "$out"/geotrain/v1/*.pyi; do
  # Generated modules import each other as top-level `geotrain.v1`; they live in geotrain._proto.
  sed -e 's/^from geotrain\.v1 import /from geotrain._proto import /' "$f" > "$out/final/$(basename "$f")"
done
if [ "${1:-}" = "--check" ]; then
  for f in "$out"/final/*; do
    if ! cmp -s "$f" "geotrain/_proto/$(basename "$f")"; then
      echo "geotrain/_proto/$(basename "$f") is stale: run scripts/gen_protos.sh" >&2; exit 1
    fi
  done
  echo "generated protobuf code is fresh"
else
  cp "$out"/final/* geotrain/_proto/
  echo "wrote $(ls "$out"/final | tr '\n' ' ')"
fi
