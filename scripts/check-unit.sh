#!/usr/bin/env bash
# Checks systemd/mqtt-lambda-bridge.service the way CI does; fails when either check fails:
#   1. `systemd-analyze verify` prints nothing (no error, no warning);
#   2. `systemd-analyze security --offline=true` rates its exposure at most $MAX_EXPOSURE.
#
# verify checks that ExecStart= names an executable file, and the unit names the installed path
# /usr/local/bin/mqtt-lambda-bridge, which a build or CI machine does not have. So verify runs
# on a copy, in a temporary directory, whose ExecStart= points at the built binary
# (target/release or target/debug), or at a stand-in executable when none is built; every
# other line is the unit as shipped.
set -euo pipefail
cd "$(dirname "$0")/.."

UNIT=systemd/mqtt-lambda-bridge.service
NAME=$(basename "$UNIT")
INSTALLED=/usr/local/bin/mqtt-lambda-bridge
# Exposure as systemd-analyze prints it (0.0 safest .. 10.0); the unit rates 1.1 today.
MAX_EXPOSURE=1.5

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "check-unit: systemd-analyze is missing (scripts/install-deps.sh installs the systemd package)" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

binary=""
for candidate in target/release/mqtt-lambda-bridge target/debug/mqtt-lambda-bridge; do
    if [ -x "$candidate" ]; then
        binary=$(realpath "$candidate")
        break
    fi
done
if [ -z "$binary" ]; then
    binary="$tmp/mqtt-lambda-bridge"
    printf '#!/bin/sh\nexit 0\n' >"$binary"
    chmod +x "$binary"
fi
grep -q "^ExecStart=$INSTALLED " "$UNIT" || {
    echo "check-unit: $UNIT: ExecStart= no longer starts with $INSTALLED; update this script" >&2
    exit 1
}
sed "s#^ExecStart=$INSTALLED #ExecStart=$binary #" "$UNIT" >"$tmp/$NAME"

failed=0
verify_out=$(systemd-analyze verify "$tmp/$NAME" 2>&1) || failed=1
if [ -n "$verify_out" ] || [ "$failed" -ne 0 ]; then
    echo "check-unit: systemd-analyze verify $UNIT (ExecStart= at $binary) is not clean:" >&2
    echo "$verify_out" >&2
    failed=1
else
    echo "check-unit: systemd-analyze verify: clean (ExecStart= at $binary)"
fi

security_out=$(systemd-analyze security --offline=true "$UNIT" 2>&1) || true
exposure=$(echo "$security_out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$exposure" ]; then
    echo "check-unit: systemd-analyze security printed no overall exposure:" >&2
    echo "$security_out" >&2
    failed=1
elif awk -v e="$exposure" -v max="$MAX_EXPOSURE" 'BEGIN { exit !(e > max) }'; then
    echo "check-unit: exposure $exposure is above $MAX_EXPOSURE; what it counts:" >&2
    echo "$security_out" | grep '✗' >&2 || true
    failed=1
else
    echo "check-unit: systemd-analyze security --offline=true: exposure $exposure (at most $MAX_EXPOSURE)"
fi
exit "$failed"
