#!/usr/bin/env bash
# Builds the image from the Dockerfile with podman (no container registry needed) and runs it:
#   scripts/container-test.sh          (as root; scripts/install-deps.sh installs podman & co.)
# 1. A base image from `debootstrap --variant=minbase bookworm` (from the mirror apt uses),
#    imported as the runtime stage's image (debian:bookworm-slim); the tarball is cached in
#    target/container-cache. A stand-in for the builder stage's image (rust:1-bookworm): that
#    base plus gcc, libc6-dev, ca-certificates and this host's own rustup toolchain.
# 2. `podman build --pull=never --format docker` of the unchanged Dockerfile (the OCI format
#    would drop HEALTHCHECK), with the host's CA bundle mounted so cargo trusts what the host
#    trusts. Prints the image size.
# 3. Runs it with --network host against a mosquitto and the fake Invoke API
#    (bench/fake_lambda.py) started here, and checks: messages delivered end to end,
#    `podman healthcheck run` healthy, the daemon running as uid 10001, `podman kill` during a
#    stream then a new container on the same volume delivering every acknowledged message,
#    and `podman stop` exiting 0 within its timeout.
# The image is amd64 only: the builder has no ARM Rust targets. The HEALTHCHECK needs port 9898
# free on the host (the config's metrics.listen).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=localhost/mqtt-lambda-bridge:container-test
# The images the Dockerfile's stages start FROM, read from it.
RUNTIME_BASE=$(awk '/^FROM / && !/ AS / {print $2}' Dockerfile | tail -1)
BUILDER_BASE=$(awk '/^FROM .* AS builder/ {print $(NF-2)}' Dockerfile)
CACHE="$PWD/target/container-cache"
METRICS_PORT=9898
STOP_TIMEOUT=10
step() { printf '==> container: %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
fail() { echo "container test: $*" >&2; exit 1; }
started=$(date +%s)

work=$(mktemp -d)
name="mlb-test-$$"
volume="mlb-test-buffer-$$"
pids=()
cleanup() {
    podman rm -f "$name" "$name-2" >/dev/null 2>&1 || true
    podman volume rm -f "$volume" >/dev/null 2>&1 || true
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# podman's defaults that fail here: higher ulimits than this machine grants, and crun, which
# refuses its cgroup layout. A config of our own, so the host's is left alone.
cat > "$work/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$work/containers.conf"

# --- the base image
mkdir -p "$CACHE"
base_tar="$CACHE/bookworm-minbase.tar"
if [ ! -s "$base_tar" ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)
    [ -n "$mirror" ] || fail "no Debian mirror found in apt's sources (/etc/apt/sources.list*)"
    step "debootstrap --variant=minbase bookworm from $mirror"
    rootfs="$work/rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; fail "debootstrap failed (log above)"; }
    tar -C "$rootfs" -cf "$base_tar.tmp" .
    mv "$base_tar.tmp" "$base_tar"
    rm -rf "$rootfs"
fi
step "importing the base as $RUNTIME_BASE"
podman import --quiet "$base_tar" "docker.io/library/$RUNTIME_BASE" >/dev/null

# --- the builder's stand-in: the base, a C toolchain and this host's Rust toolchain
toolchain=$(rustup show active-toolchain | awk '{print $1}')
toolchain_dir="$(rustup show home)/toolchains/$toolchain"
step "builder stand-in $BUILDER_BASE from the base and rustup toolchain $toolchain"
ctx="$work/builder"
mkdir -p "$ctx/rustup/toolchains" "$ctx/cargo/bin"
# The host's toolchain without its documentation and its ARM standard libraries.
tar -C "$toolchain_dir" --exclude=./share/doc --exclude='./lib/rustlib/a*-linux-*' \
    --exclude='./lib/rustlib/manifest-rust-std-a*' -cf - . \
    | { mkdir "$ctx/rustup/toolchains/$toolchain" && tar -C "$ctx/rustup/toolchains/$toolchain" -xf -; }
printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$toolchain" \
    > "$ctx/rustup/settings.toml"
cp "$(command -v rustup)" "$ctx/cargo/bin/rustup"
for proxy in cargo rustc rustdoc; do ln -s rustup "$ctx/cargo/bin/$proxy"; done
cat > "$ctx/Containerfile" <<CONTAINERFILE
FROM docker.io/library/$RUNTIME_BASE
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:\$PATH
CONTAINERFILE
podman build --quiet --pull=never --network host -t "docker.io/library/$BUILDER_BASE" "$ctx" >/dev/null

# --- the image, from the Dockerfile as it is
step "podman build of the Dockerfile"
podman build --pull=never --format docker --network host \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -t "$IMAGE" . > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; fail "podman build failed (log above)"; }
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "docker.io/library/$RUNTIME_BASE")
mib() { awk -v s="$1" 'BEGIN {printf "%.1f MiB", s / 1048576}'; }
echo "image $IMAGE: $(mib "$size") ($size bytes), of which the debootstrap base $(mib "$base_size")" \
    "and the Dockerfile's layers $(mib $(( size - base_size ))); built in $(( $(date +%s) - started ))s"
[ "$(podman image inspect --format '{{.Config.Healthcheck}}' "$IMAGE")" != "<nil>" ] \
    || fail "the image has no HEALTHCHECK (built without --format docker?)"

# --- a broker and the fake Invoke API on this host
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
    fail "nothing listens on port $1"
}
if (exec 3<>/dev/tcp/127.0.0.1/$METRICS_PORT) 2>/dev/null; then
    fail "port $METRICS_PORT is in use on this host: the image's HEALTHCHECK probes it (metrics.listen)"
fi
broker_port=$(free_port)
# No cap on the messages queued for a disconnected session (mosquitto's default drops past 1,000
# while the bridge is killed: messages it acknowledged to the publisher).
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n' "$broker_port" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
pids+=($!)
lambda_port=$(free_port)
accepted="$work/accepted.txt"
: > "$accepted"
python3 bench/fake_lambda.py --port "$lambda_port" --log "$accepted" &
pids+=($!)
wait_port "$broker_port"
wait_port "$lambda_port"

cat > "$work/config.toml" <<TOML
[mqtt]
url = "mqtt://127.0.0.1:$broker_port"
client_id = "container-test"
[aws]
region = "us-east-1"
endpoint_url = "http://127.0.0.1:$lambda_port"
[metrics]
listen = "127.0.0.1:$METRICS_PORT"
[[rules]]
name = "ctest"
topic = "ctest/+"
function = "sink"
TOML
chmod 0644 "$work/config.toml"

# Without systemd, podman cannot schedule the HEALTHCHECK's timer and says so on every start;
# `podman healthcheck run` runs it on demand all the same.
quiet_systemd() { grep -v 'unable to get systemd connection\|healthcheck: unable to get systemd' >&2 || true; }
run_container() {
    podman run -d --name "$1" --network host \
        -v "$work/config.toml:/etc/mqtt-lambda-bridge/config.toml:ro" \
        -v "$volume:/var/lib/mqtt-lambda-bridge" \
        -e AWS_ACCESS_KEY_ID=test -e AWS_SECRET_ACCESS_KEY=test -e AWS_EC2_METADATA_DISABLED=true \
        "$IMAGE" > /dev/null 2> >(quiet_systemd)
}
healthy() {
    for _ in $(seq 60); do podman healthcheck run "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done
    podman logs "$1" 2>&1 | tail -20
    fail "container $1 never became healthy (podman healthcheck run; its log above)"
}
# Publishes keys PREFIX-1..PREFIX-N at QoS 1, one message per line; mosquitto_pub returns once
# the broker has acknowledged them.
publish() {
    seq "$2" | sed "s/.*/{\"k\":\"$1-&\"}/" \
        | mosquitto_pub -h 127.0.0.1 -p "$broker_port" -q 1 -i "ctest-pub-$1" -t ctest/dev1 -l
}
# Waits until the function received every key PREFIX-1..PREFIX-N at least once.
delivered() {
    for _ in $(seq 300); do
        got=$(grep -c "^sink $1-" "$accepted" | tr -d ' ' || true)
        missing=$(comm -23 <(seq "$2" | sed "s/^/$1-/" | sort) <(awk '{print $2}' "$accepted" | sort -u) | wc -l)
        [ "$missing" -eq 0 ] && { echo "$1: all $2 delivered ($got deliveries)"; return 0; }
        sleep 0.2
    done
    podman logs "$name-2" 2>&1 | tail -20
    fail "$1: $missing of $2 acknowledged messages never reached the function (the bridge's log above)"
}

step "run: health, delivery, user"
run_container "$name"
healthy "$name"
publish first 100
delivered first 100
pid=$(podman inspect --format '{{.State.Pid}}' "$name")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 10001 ] || fail "the daemon runs as uid $uid, not 10001"
echo "the daemon runs as uid $uid"

step "podman kill during a stream, then a new container on the same volume"
publish stream 3000 &
publisher=$!
for _ in $(seq 400); do [ "$(grep -c "^sink stream-" "$accepted")" -ge 300 ] && break; sleep 0.05; done
podman kill "$name" > /dev/null 2> >(quiet_systemd)
echo "killed after $(grep -c '^sink stream-' "$accepted") stream deliveries"
wait "$publisher" || fail "mosquitto_pub could not publish the stream"
podman rm "$name" > /dev/null 2> >(quiet_systemd)
run_container "$name-2"
healthy "$name-2"
delivered stream 3000

step "podman stop: graceful, exit 0 within ${STOP_TIMEOUT}s"
before=$(date +%s%N)
podman stop -t "$STOP_TIMEOUT" "$name-2" > /dev/null 2> >(quiet_systemd)
took_ms=$(( ($(date +%s%N) - before) / 1000000 ))
code=$(podman inspect --format '{{.State.ExitCode}}' "$name-2")
[ "$code" = 0 ] || { podman logs "$name-2" 2>&1 | tail -10; fail "the container exited $code on podman stop"; }
[ "$took_ms" -lt $(( STOP_TIMEOUT * 1000 )) ] || fail "podman stop took ${took_ms} ms (timeout ${STOP_TIMEOUT}s)"
echo "stopped with exit code 0 in ${took_ms} ms"
step "done in $(( $(date +%s) - started ))s"
