#!/usr/bin/env bash
# Measures the release binary's size and the daemon's idle memory with one rule connected and
# the metrics listener on (scraped once before measuring, as Prometheus would).
#   bench/footprint.sh            (needs mosquitto; prints the README's table rows)
#   TELEMETRY=1 bench/footprint.sh   the same with [telemetry] publishing every second (five
#                                    snapshots published before the measurement)
#   BIN=/tmp/other/mqtt-lambda-bridge bench/footprint.sh   another build of the binary
#   FOOTPRINT_SQL=1 bench/footprint.sh    the rule is an SQL rule (sql = "SELECT … WHERE …")
set -euo pipefail
cd "$(dirname "$0")/.."

# BIN=path/to/mqtt-lambda-bridge measures that binary instead (e.g. one built from another
# commit, to compare on the same machine at the same time).
bin=${BIN:-target/release/mqtt-lambda-bridge}
[ -n "${BIN:-}" ] || cargo build --release --quiet
size=$(stat -c %s "$bin")

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
rule='topic = "sensors/+/temperature"'
what="one rule"
if [ "${FOOTPRINT_SQL:-}" = 1 ]; then
    rule="sql = \"SELECT temperature AS t, topic(2) AS device FROM 'sensors/+/temperature' WHERE temperature > 50\""
    what="one SQL rule (WHERE + SELECT)"
fi
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

cat > "$work/config.toml" <<TOML
[mqtt]
url = "mqtt://127.0.0.1:$port"
client_id = "footprint"
[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:9"
[buffer]
dir = "$work/buffer"
[metrics]
listen = "127.0.0.1:$metrics_port"
[[rules]]
name = "t"
$rule
function = "f"
TOML
if [ "${TELEMETRY:-0}" = 1 ]; then
    printf '[telemetry]\ntopic = "gw/footprint/health"\ninterval = "1s"\n' >> "$work/config.toml"
fi

AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x AWS_EC2_METADATA_DISABLED=true \
    "$bin" run --config "$work/config.toml" 2> "$work/daemon.log" &
daemon=$!
pids+=($daemon)
for _ in $(seq 200); do grep -q subscribed "$work/daemon.log" && break; sleep 0.05; done
grep -q subscribed "$work/daemon.log" || { cat "$work/daemon.log"; exit 1; }
# One scrape, so the listener and the exposition have run once.
exec 3<>/dev/tcp/127.0.0.1/"$metrics_port"
printf 'GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
grep -q '^mlb_mqtt_connected 1' <&3 || { echo "the metrics scrape failed" >&2; exit 1; }
exec 3<&-
sleep 5
rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$daemon/status")
hwm_kib=$(awk '/^VmHWM/ {print $2}' "/proc/$daemon/status")

awk -v s="$size" -v r="$rss_kib" -v h="$hwm_kib" -v w="$what" 'BEGIN {
    printf "| release binary (x86_64, stripped, `opt-level = \"z\"`, fat LTO, 1 codegen unit, `panic = \"abort\"`) | %.2f MiB | ≤ 6.5 MiB |\n", s / 1048576
    printf "| idle RSS, %s connected to mosquitto, metrics on and scraped once, after 5 s | %.2f MiB (peak %.2f MiB) | ≤ 8 MiB |\n", w, r / 1024, h / 1024
}'
