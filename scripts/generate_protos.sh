#!/usr/bin/env bash
# Generates agentrun/v1/ and agentrun/internal/v1/ (Python messages, gRPC stubs and their type
# stubs) from protos/.
# The one command that produces generated code: `make proto` runs it. Never edit its output.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
bindir=$(dirname "$python")
rm -f agentrun/v1/*_pb2*.py agentrun/v1/*_pb2*.pyi agentrun/internal/v1/*_pb2*.py agentrun/internal/v1/*_pb2*.pyi
PATH="$bindir:$PATH" "$python" -m grpc_tools.protoc \
  -I protos \
  --python_out=. --grpc_python_out=. \
  --mypy_out=quiet:. --mypy_grpc_out=quiet:. \
  protos/agentrun/v1/*.proto protos/agentrun/internal/v1/*.proto
for out in agentrun/v1 agentrun/internal/v1; do
  printf '"""Generated from protos/%s by `make proto`. Do not edit."""\n' "$out" > "$out/__init__.py"
  touch "$out/py.typed"
done
printf '"""Generated from protos/agentrun/internal by `make proto`. Do not edit."""\n' \
  > agentrun/internal/__init__.py
printf '"""The contract'"'"'s generated code (from protos/ by `make proto`; never edited): agentrun.v1,\n%s\n' \
  'the public API, and agentrun.internal.v1, between gateways and executors."""' > agentrun/__init__.py
touch agentrun/py.typed
