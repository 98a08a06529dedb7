#!/usr/bin/env bash
# Run every test suite (core, then each integration) with one pytest per package; exit code 5
# ("no tests collected") is a failure, never a silent pass. -rs: the summary names every skipped test's reason
# (e.g. a Debian package `make system-deps` could not install).
set -u
PY="$1"; shift
status=0
suites=(tests)
for d in integrations/langchain/tests integrations/llamaindex/tests; do
  [ -d "$d" ] && suites+=("$d")
done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for suite in "${suites[@]}"; do
  echo "=== pytest $suite"
  "$PY" -m pytest "$suite" -q -rs -p no:cacheprovider "$@"
  rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "ERROR: pytest collected no tests in $suite"
    status=1
  elif [ "$rc" -ne 0 ]; then
    status=1
  fi
done
exit $status
