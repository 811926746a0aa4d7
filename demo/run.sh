#!/usr/bin/env bash
# One-command local demo: Mosquitto as the broker, MiniStack standing in for AWS Lambda, the
# bridge in between, and a Python function that records every event it receives.
#
# Needs Debian/Ubuntu with Rust (cargo) and python3; installs mosquitto and ministack when
# missing. Everything runs on 127.0.0.1 on free ports and is stopped when the script exits.
# DEMO_KEEP=1 keeps the temporary directory (logs, config, recorded events) afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '==> %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

find_mosquitto() {
    command -v mosquitto 2>/dev/null || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true
}

# --- prerequisites -----------------------------------------------------------------------------

# mosquitto from Debian's packages, and MiniStack pinned in the project's own virtual
# environment (target/venv), never in the system Python: the same install step as the tests.
# (Debian's mosquitto package enables a system broker on port 1883; the demo runs its own.)
"$ROOT/scripts/install-deps.sh" --demo
PATH="$ROOT/target/venv/bin:$PATH"
MOSQUITTO="$(find_mosquitto)"
[ -n "$MOSQUITTO" ] && command -v ministack >/dev/null 2>&1 \
    || { echo "error: mosquitto or ministack missing after scripts/install-deps.sh --demo" >&2; exit 1; }

say "building the bridge (cargo build --release: several minutes the first time, fat LTO)"
cargo build --release
BRIDGE="$ROOT/target/release/mqtt-lambda-bridge"

# --- processes and cleanup ---------------------------------------------------------------------

TMP="$(mktemp -d -t mqtt-lambda-bridge-demo.XXXXXX)"
BRIDGE_PID=""
MINISTACK_PID=""
MOSQUITTO_PID=""
OK=0

# Each background process gets its own process group (setsid), so stopping it also stops
# whatever it started (MiniStack's function workers).
stop_group() {
    local pid="$1" grace="$2"
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((grace * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    [ "$OK" -eq 1 ] && say "stopping MiniStack and mosquitto"
    # The bridge first, with SIGTERM: it finishes in-flight invocations (shutdown_timeout).
    stop_group "$BRIDGE_PID" 12
    stop_group "$MINISTACK_PID" 5
    stop_group "$MOSQUITTO_PID" 5
    [ "$OK" -eq 1 ] && say "done"
    if [ "$OK" -eq 1 ] && [ -z "${DEMO_KEEP:-}" ]; then
        rm -rf "$TMP"
    elif [ "$OK" -eq 1 ]; then
        echo "logs and files kept in $TMP"
    else
        for log in bridge.log ministack.log mosquitto.log; do
            if [ -s "$TMP/$log" ]; then
                echo "--- last lines of $TMP/$log" >&2
                tail -n 20 "$TMP/$log" >&2
            fi
        done
        echo "demo failed; logs and files kept in $TMP" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
    echo "error: $*" >&2
    exit 1
}

# Two distinct free ports, chosen by the kernel.
read -r MQTT_PORT LAMBDA_PORT < <(python3 -c '
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')

port_open() {
    python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$1" 2>/dev/null
}

http_answers() {
    # Any HTTP response, even an error status, means the server is up.
    python3 - "$1" <<'PY' 2>/dev/null
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).close()
except urllib.error.HTTPError:
    pass
PY
}

# --- broker ------------------------------------------------------------------------------------

say "starting mosquitto on 127.0.0.1:$MQTT_PORT"
cat >"$TMP/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
EOF
setsid "$MOSQUITTO" -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 &
MOSQUITTO_PID=$!
for _ in $(seq 100); do
    port_open "$MQTT_PORT" && break
    kill -0 "$MOSQUITTO_PID" 2>/dev/null || fail "mosquitto exited"
    sleep 0.1
done
port_open "$MQTT_PORT" || fail "mosquitto is not listening on port $MQTT_PORT"

# --- Lambda (MiniStack) ------------------------------------------------------------------------

say "starting ministack (Lambda) on 127.0.0.1:$LAMBDA_PORT"
(
    cd "$TMP"
    BIND_HOST=127.0.0.1 GATEWAY_PORT="$LAMBDA_PORT" IOT_MTLS_ENABLED=0 LAMBDA_EXECUTOR=local \
        exec setsid ministack >"$TMP/ministack.log" 2>&1
) &
MINISTACK_PID=$!
for _ in $(seq 60); do
    http_answers "http://127.0.0.1:$LAMBDA_PORT/_ministack/health" && break
    kill -0 "$MINISTACK_PID" 2>/dev/null || fail "ministack exited"
    sleep 0.5
done
http_answers "http://127.0.0.1:$LAMBDA_PORT/_ministack/health" \
    || fail "ministack did not answer on port $LAMBDA_PORT within 30s"

RECORD="$TMP/events.jsonl"
say "deploying function demo-temperature (demo/handler.py)"
python3 demo/deploy_function.py --endpoint "http://127.0.0.1:$LAMBDA_PORT" \
    --name demo-temperature --record-file "$RECORD" --region us-east-1

# --- the bridge --------------------------------------------------------------------------------

sed -e "s|@MQTT_PORT@|$MQTT_PORT|g" \
    -e "s|@LAMBDA_PORT@|$LAMBDA_PORT|g" \
    -e "s|@BUFFER_DIR@|$TMP/buffer|g" \
    demo/config.toml >"$TMP/config.toml"
mkdir -p "$TMP/buffer"

say "checking the configuration"
"$BRIDGE" check --config "$TMP/config.toml"

say "starting mqtt-lambda-bridge"
AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true RUST_LOG=info \
    setsid "$BRIDGE" run --config "$TMP/config.toml" >"$TMP/bridge.log" 2>&1 &
BRIDGE_PID=$!
for _ in $(seq 100); do
    [ "$(grep -c subscribed "$TMP/bridge.log" || true)" -ge 2 ] && break
    kill -0 "$BRIDGE_PID" 2>/dev/null || fail "mqtt-lambda-bridge exited"
    sleep 0.1
done
[ "$(grep -c subscribed "$TMP/bridge.log" || true)" -ge 2 ] \
    || fail "mqtt-lambda-bridge did not subscribe within 10s"

# --- messages ----------------------------------------------------------------------------------

pub() { mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1 -t "$1" -m "$2"; }

say "publishing 4 temperature readings, 5 status messages and 1 message on an unmatched topic"
pub sensors/dev1/temperature '{"c": 21.5}'
pub sensors/dev2/temperature '{"c": 19.0}'
pub sensors/dev1/temperature '{"c": 21.7}'
pub sensors/dev2/temperature 'twenty degrees'
for i in 1 2 3 4 5; do
    pub devices/dev1/status "{\"seq\": $i, \"battery\": $((100 - i))}"
done
pub other/topic 'nobody listens here'

# 4 temperature events of one message each, and the 5 status messages in one or more batches.
progress() {
    python3 - "$RECORD" <<'PY'
import json, sys
temperature = status = batches = 0
try:
    with open(sys.argv[1], encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:  # a line still being written
                continue
            if event.get("rule") == "temperature":
                temperature += 1
            elif event.get("rule") == "status":
                batches += 1
                status += len(event.get("messages", []))
except FileNotFoundError:
    pass
print(temperature, status, batches)
PY
}

say "waiting for the function to receive them"
done_waiting=0
temperature=0 status=0 batches=0
for _ in $(seq 80); do
    read -r temperature status batches < <(progress)
    if [ "$temperature" -ge 4 ] && [ "$status" -ge 5 ]; then
        done_waiting=1
        break
    fi
    sleep 0.25
done
[ "$done_waiting" -eq 1 ] || fail "after 20s the function had $temperature temperature events and $status status messages (expected 4 and 5)"

echo
echo "What the function received:"
# In the order the messages arrived at the bridge: Event invocations may run in any order.
python3 - "$RECORD" <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    events = [json.loads(line) for line in f if line.strip()]
events.sort(key=lambda e: min((m.get("received_at", "") for m in e.get("messages", [])), default=""))
for event in events:
    print()
    print(json.dumps(event, indent=2))
PY
echo
# Stop the bridge now (SIGTERM): on the way out it logs one summary line per rule, what it
# delivered and dropped; those lines, with its subscriptions, are the routing in its own words.
say "stopping the bridge (SIGTERM); its log:"
stop_group "$BRIDGE_PID" 12
BRIDGE_PID=""
grep -E 'mqtt-lambda-bridge started|subscribed|rule summary' "$TMP/bridge.log" | sed 's/^/    /'
echo
unmatched="$(grep -c '"other/topic"' "$RECORD" || true)"
say "the function received $temperature temperature events (one message each), $status status messages in $batches batch(es), and $unmatched event(s) with other/topic"
OK=1
