#!/usr/bin/env bash
# The suite on a busy machine: runs the Makefile's test target with CPU-bound processes beside it (two by default,
# like two other jobs on a 2-core machine), and passes only if the suite passes. The busy processes are bounded by
# a timeout and ended on exit, whether the suite passed, failed or was interrupted.
#   tests/scripts/under_load.sh                                 # make test beside two busy processes
#   BUSY_PROCESSES=4 tests/scripts/under_load.sh PYTEST_ARGS="tests/replication/test_stages.py"
set -euo pipefail

BUSY_PROCESSES=${BUSY_PROCESSES:-2}
BUSY_LIMIT_S=${BUSY_LIMIT_S:-10800}  # a bound in case this script itself is killed with SIGKILL
MAKE_TARGET=${MAKE_TARGET:-test}

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

busy_pids=()
end_busy_processes() {
    for pid in "${busy_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait "${busy_pids[@]}" 2>/dev/null || true
}
trap end_busy_processes EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Each busy process bounds itself (no wrapper between this shell and it, so the kill below reaches it for sure).
for _ in $(seq "$BUSY_PROCESSES"); do
    python3 -c 'import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass' "$BUSY_LIMIT_S" </dev/null >/dev/null 2>&1 &
    busy_pids+=("$!")
done
echo "under_load: $BUSY_PROCESSES busy processes (${busy_pids[*]}) beside make $MAKE_TARGET $*" >&2

start=$SECONDS
make "$MAKE_TARGET" "$@"
echo "under_load: make $MAKE_TARGET passed in $((SECONDS - start)) s beside $BUSY_PROCESSES busy processes" >&2
