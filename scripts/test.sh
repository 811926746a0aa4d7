#!/usr/bin/env bash
# The whole test suite, from a fresh Debian or Ubuntu machine with Rust:
#   scripts/test.sh
# Installs what is missing (mosquitto, MiniStack, cargo-nextest), then checks formatting and
# lints, and runs every unit, property and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export PATH="$HOME/.local/bin:$PATH"

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo nextest run --locked --no-fail-fast "$@"
