#!/usr/bin/env bash
# Installs what the tests and the demo need, when missing: mosquitto, systemd-analyze and
# prometheus (Debian's packages: tests/metrics.rs runs promtool and a Prometheus server of its
# own), MiniStack (PyPI) and cargo-nextest. Safe to run again; it changes nothing when all is
# there.
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
new_prometheus=false
if ! have promtool || ! have prometheus; then
    packages+=(prometheus)
    new_prometheus=true
fi
if [ "${#packages[@]}" -gt 0 ]; then
    echo "installing ${packages[*]} from Debian's packages"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# The package starts a system-wide Prometheus on port 9090 where systemd runs; the tests start
# their own on a free port, so stop the one just installed rather than leave it scraping.
if $new_prometheus && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
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
