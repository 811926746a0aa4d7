#!/usr/bin/env bash
# Installs what the tests and the demo need, when missing: mosquitto and systemd-analyze
# (Debian's packages), MiniStack (PyPI) and cargo-nextest. Safe to run again; it changes
# nothing when all is there.
set -euo pipefail

MINISTACK_VERSION=1.5.33
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export PATH="$HOME/.local/bin:$PATH"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

packages=()
have mosquitto || packages+=(mosquitto)
have mosquitto_pub || packages+=(mosquitto-clients)
have python3 || packages+=(python3)
# systemd-analyze, for scripts/check-unit.sh (verify and security of the unit file).
have systemd-analyze || packages+=(systemd)
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "installing ${packages[*]} from Debian's packages"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if ! have ministack; then
    echo "installing ministack $MINISTACK_VERSION from PyPI"
    python3 -m pip install --quiet "ministack==$MINISTACK_VERSION" 2>/dev/null \
        || python3 -m pip install --quiet --user --break-system-packages "ministack==$MINISTACK_VERSION"
    hash -r
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install --quiet --locked cargo-nextest
fi
