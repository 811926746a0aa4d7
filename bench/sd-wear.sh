#!/usr/bin/env bash
# SD-card wear: bytes written per message with and without buffer.max_ack_delay, the delay's
# cost in PUBACK latency and in ingest throughput against the broker's in-flight window, and
# what a full-speed drain writes (benches/wear.rs; needs mosquitto).
#   bench/sd-wear.sh              (the README's rows on stdout)
# As root it puts the buffers on a fresh 1 GiB ext4 file system on a loop device, so the
# device figure counts the bridge's writes alone (the journal included) and nothing else on
# this shared machine's disk. Otherwise the buffers go under target/ and the device figure
# includes every other writer of that disk. Environment variables pass through (BENCH_ONLY,
# BENCH_WEAR_RUNS, BENCH_WEAR_SECS, ...; see the head of benches/wear.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo bench --quiet --bench wear --no-run
if [ "$(id -u)" = 0 ] && command -v mkfs.ext4 >/dev/null; then
    image=target/sd-wear.img
    mnt=$(mktemp -d)
    cleanup() {
        umount "$mnt" 2>/dev/null || true
        rmdir "$mnt" 2>/dev/null || true
        rm -f "$image"
    }
    trap cleanup EXIT
    rm -f "$image"
    truncate -s 1G "$image"
    mkfs.ext4 -q -F "$image"
    mount -o loop "$image" "$mnt"
    echo "buffers on a fresh ext4 loop device: $(findmnt -n -o SOURCE "$mnt")" >&2
    BENCH_DIR="$mnt" cargo bench --quiet --bench wear
else
    echo "not root (or no mkfs.ext4): the device figure includes other writes to this disk" >&2
    cargo bench --quiet --bench wear
fi
