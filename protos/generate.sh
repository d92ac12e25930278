#!/usr/bin/env bash
# Regenerate pdmesh/v1/*_pb2*.py from protos/ (never edit the generated files by hand).
# Usage: protos/generate.sh [OUT_DIR]   (default: the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
python -m grpc_tools.protoc -I"$root/protos" --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  "$root"/protos/pdmesh/v1/*.proto
touch "$out/pdmesh/v1/__init__.py"
