#!/usr/bin/env bash
# Generates agentrun/v1/ (Python messages, gRPC stubs and their type stubs) from protos/.
# The one command that produces generated code: `make proto` runs it. Never edit its output.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
bindir=$(dirname "$python")
out=agentrun/v1
rm -f "$out"/*_pb2*.py "$out"/*_pb2*.pyi
PATH="$bindir:$PATH" "$python" -m grpc_tools.protoc \
  -I protos \
  --python_out=. --grpc_python_out=. \
  --mypy_out=quiet:. --mypy_grpc_out=quiet:. \
  protos/agentrun/v1/*.proto
printf '"""Generated from protos/agentrun/v1 by `make proto`. Do not edit."""\n' > "$out/__init__.py"
touch "$out/py.typed"
