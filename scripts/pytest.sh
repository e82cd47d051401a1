#!/usr/bin/env bash
# Run pytest in the venv; "no tests collected" (exit 5) is a failure, not a pass.
set -u
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
