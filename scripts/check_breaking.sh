#!/usr/bin/env bash
# buf breaking (FILE rules) of protos/ against a base commit: the first argument, or HEAD~1.
# A base that has no buf.yaml yet (the contract's first commit) has nothing to break.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-HEAD~1}
if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
  echo "proto-breaking: no commit $base; nothing to compare against"
  exit 0
fi
if ! git cat-file -e "$base:buf.yaml" 2>/dev/null; then
  echo "proto-breaking: $base has no buf.yaml; nothing to compare against"
  exit 0
fi
node_modules/.bin/buf breaking --against ".git#ref=$(git rev-parse "$base")"
echo "proto-breaking: no breaking change against $base"
