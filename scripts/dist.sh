#!/usr/bin/env bash
# Release artifacts from a clean clone on an x86_64 Debian (bookworm) machine:
#   dist/<target>/mqtt-lambda-bridge            x86_64, aarch64 (Pi 3/4/5 64-bit), armv7 (32-bit)
#   dist/mqtt-lambda-bridge_<version>_<arch>.deb amd64, arm64, armhf
#   dist/SHA256SUMS
# Installs what is missing: Debian's cross gcc (linker, and C compiler for ring; see
# .cargo/config.toml), the rustup targets, cargo-deb. No Docker; downloads come only from
# Debian's and Rust's package registries.
#
#   scripts/dist.sh                    # everything, profile "release" (fat LTO)
#   DIST_TARGETS="aarch64-unknown-linux-gnu" scripts/dist.sh
#   DIST_PROFILE=dev scripts/dist.sh   # another cargo profile, e.g. for trying the packaging
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf"
TARGETS="${DIST_TARGETS:-$ALL_TARGETS}"
PROFILE="${DIST_PROFILE:-release}"
DIST="${DIST_DIR:-dist}"
NAME=mqtt-lambda-bridge
# cargo-deb's version, pinned so a clean clone builds the same packages.
CARGO_DEB_VERSION=3.8.0

say() { printf '==> %s\n' "$*"; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- tools -------------------------------------------------------------------------------------

# Debian package (gcc and the target's libc headers) per cross target.
cross_packages() {
    case "$1" in
    x86_64-unknown-linux-gnu) ;; # the machine's own gcc
    aarch64-unknown-linux-gnu) echo gcc-aarch64-linux-gnu libc6-dev-arm64-cross ;;
    armv7-unknown-linux-gnueabihf) echo gcc-arm-linux-gnueabihf libc6-dev-armhf-cross ;;
    *) echo "unknown target $1: use one of $ALL_TARGETS" >&2; exit 64 ;;
    esac
}

missing=()
for target in $TARGETS; do
    for package in $(cross_packages "$target"); do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep 'ok installed' >/dev/null \
            || missing+=("$package")
    done
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} from Debian's packages"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

installed_targets="$(rustup target list --installed)"
for target in $TARGETS; do
    if ! grep -qx "$target" <<<"$installed_targets"; then
        say "adding the Rust target $target"
        rustup target add "$target"
    fi
done

if ! cargo deb --version >/dev/null 2>&1; then
    say "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked --version "$CARGO_DEB_VERSION" cargo-deb
fi

# --- binaries ----------------------------------------------------------------------------------

rm -rf "$DIST"
mkdir -p "$DIST"
for target in $TARGETS; do
    say "building $target (profile $PROFILE)"
    cargo build --locked --profile "$PROFILE" --target "$target"
    mkdir -p "$DIST/$target"
    cp "target/$target/$PROFILE/$NAME" "$DIST/$target/$NAME"
done

# --- Debian packages ---------------------------------------------------------------------------

# The packaged unit is the repository's, with the binary where the package puts it.
mkdir -p target/packaging
sed -e "s|/usr/local/bin/$NAME|/usr/bin/$NAME|g" systemd/$NAME.service \
    >target/packaging/$NAME.service
grep -q "^ExecStart=/usr/bin/$NAME " target/packaging/$NAME.service \
    || { echo "systemd/$NAME.service: no ExecStart=/usr/local/bin/$NAME to rewrite" >&2; exit 1; }

for target in $TARGETS; do
    say "packaging $target"
    # --no-build: the binary above; --no-strip: the profile strips already (and the host's
    # strip does not know ARM).
    cargo deb --no-build --no-strip --target "$target" --profile "$PROFILE" --output "$DIST/"
done

# --- checksums ---------------------------------------------------------------------------------

(cd "$DIST" && find . -type f ! -name SHA256SUMS | sed 's|^\./||' | sort | xargs sha256sum >SHA256SUMS)
say "artifacts in $DIST/:"
(cd "$DIST" && ls -l -- */"$NAME" *.deb && cat SHA256SUMS)
