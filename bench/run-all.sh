#!/usr/bin/env bash
# Runs every benchmark behind the README's "Measured" table and collects its rows.
#   bench/run-all.sh              (needs mosquitto, mosquitto_sub, python3; root drops caches
#                                  and gives bench/sd-wear.sh its own ext4 loop device)
# Output: the rows on stdout, ready to paste, also kept in target/bench-results.md; each run's
# details (stderr) in target/bench-results.md.log. Environment variables of the benches pass through (BENCH_PAIRS,
# BENCH_ONLY, BENCH_DIR, ...; see the heads of benches/ingest.rs and benches/buffer.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/bench-results.md
mkdir -p target
: > "$out.log"
{
    echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(uptime)"
    cargo bench --quiet --no-run
    bench/footprint.sh
    cargo bench --quiet --bench buffer
    cargo bench --quiet --bench ingest
    bench/sd-wear.sh
    echo "# done: $(uptime)"
} 2> >(tee -a "$out.log" >&2) | tee "$out"
echo "rows saved in $out, details in $out.log" >&2
