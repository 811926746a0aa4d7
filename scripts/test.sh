#!/usr/bin/env bash
# The whole test suite, from a fresh Debian or Ubuntu machine with Rust:
#   scripts/test.sh
# Installs what is missing (mosquitto, systemd-analyze, MiniStack, cargo-nextest), then checks
# formatting, lints and the systemd unit (scripts/check-unit.sh), and runs every unit, property
# and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.local/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
scripts/check-unit.sh
cargo nextest run --locked --no-fail-fast "$@"
