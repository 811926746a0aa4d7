#!/usr/bin/env bash
# The soak: the release binary under mixed traffic for DURATION (default 1h) while everything
# around it fails, then the figures and a chart.
#   bench/soak.sh [DURATION]      # 1h, 3m, 90s or seconds; needs mosquitto, python3
# 10 rules; 5 publishers, 50 msg/s in all, QoS 0/1/2 in turn; mosquitto (persistence on) restarted
# every few minutes; the fake Invoke API (bench/fake_lambda.py) cycling through ok, throttled,
# failing with 5xx and slow; a SIGHUP reload adding or removing a rule every few minutes; one
# rule's function missing for 10 s early on (its events are dead-lettered), then the daemon
# stopped, `buffer dead-letters replay` run and the daemon started again (at 30%).
# Every 10 s a row of soak.csv: RSS, open fds, threads, buffer bytes and the daemon's metrics.
# At the end it prints messages published, delivered (unique), lost, duplicates, and the RSS and
# fd trend over the second half, and draws soak.png. Exits 1 when an acknowledged QoS 1/2 message
# is lost, or RSS grows more than SOAK_MAX_RSS_GROWTH_MIB (1) or the fewest open fds rise over
# the second half. QoS 0 messages may be lost when the broker restarts (MQTT's semantics): they
# are counted apart. Output in SOAK_DIR (default target/soak-DURATION).
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${1:-1h}"
case "$duration" in
    *h) seconds=$(( ${duration%h} * 3600 )) ;;
    *m) seconds=$(( ${duration%m} * 60 )) ;;
    *s) seconds=${duration%s} ;;
    *) seconds=$duration ;;
esac
out="${SOAK_DIR:-target/soak-$duration}"

# mosquitto, and paho-mqtt and matplotlib in target/venv.
scripts/install-deps.sh --demo >&2
cargo build --release --locked --quiet
rm -rf "$out"
mkdir -p "$out"
echo "soak: ${seconds}s, output in $out" >&2
status=0
# A copy, so that a build during the soak does not change the binary its restarts run.
cp target/release/mqtt-lambda-bridge "$out/mqtt-lambda-bridge"
target/venv/bin/python bench/soak.py --duration "$seconds" --bin "$out/mqtt-lambda-bridge" \
    --out "$out" --max-rss-growth-mib "${SOAK_MAX_RSS_GROWTH_MIB:-1}" || status=$?
target/venv/bin/python bench/soak_chart.py "$out" "$out/soak.png"
echo "chart: $out/soak.png, samples: $out/soak.csv" >&2
exit "$status"
