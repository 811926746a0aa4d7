#!/usr/bin/env bash
# Installs the amd64 Debian package on this machine and takes it out again, checking what the
# README promises: binary in /usr/bin, the unit enabled but not started, the config a conffile
# that `check` refuses until a rule is added and accepts after, an edit that survives
# reinstalling, `dpkg -r` leaving only the buffer and the edited config, `dpkg -P` leaving
# nothing. Run as root, on a machine where the package is not installed.
#   DEB_PROFILE=release scripts/deb-test.sh   # the cargo profile of the packaged binary
#   DEB_FILE=dist/mqtt-lambda-bridge_0.1.0_amd64.deb scripts/deb-test.sh   # a package built before
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=mqtt-lambda-bridge
OUT=target/deb-test
PROFILE="${DEB_PROFILE:-release}"
CONFIG=/etc/$NAME/config.toml
# What dpkg and systemd's helpers may touch; everything else is out of the package's reach.
WATCHED=(/usr/bin /usr/share/doc /lib/systemd/system /etc /var/lib)

fail() { echo "deb-test: FAILED: $*" >&2; exit 1; }
say() { printf 'deb-test: %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs a package)"
if dpkg-query -W -f='${Status}' "$NAME" 2>/dev/null | grep installed >/dev/null; then
    fail "$NAME is installed on this machine already; not touching it"
fi
# The package must create no buffer; one already there would hide whether it did.
[ ! -e /var/lib/$NAME ] \
    || fail "/var/lib/$NAME exists before installing (left by a daemon run with the default buffer.dir); remove it and run again"

if [ -n "${DEB_FILE:-}" ]; then
    deb="$DEB_FILE"
else
    say "building the amd64 package (profile $PROFILE)"
    DIST_DIR="$OUT" DIST_PROFILE="$PROFILE" DIST_TARGETS=x86_64-unknown-linux-gnu scripts/dist.sh >/dev/null
    deb="$(ls "$OUT"/${NAME}_*_amd64.deb)"
fi
version="$(dpkg-deb -f "$deb" Version)"
[ "$(basename "$deb")" = "${NAME}_${version}_amd64.deb" ] || fail "package file name $(basename "$deb")"

# Every path under the watched roots, dpkg's and apt's own bookkeeping aside.
snapshot() {
    find "${WATCHED[@]}" -xdev \
        \( -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/lib/systemd/deb-systemd-helper-masked \) -prune \
        -o -print 2>/dev/null | sort
}
before="$(mktemp)"; after="$(mktemp)"
installed=no
# A failed run purges what it installed, so the next run starts from the same machine.
cleanup() {
    rm -f "$before" "$after"
    if [ "$installed" = yes ]; then
        dpkg -P "$NAME" >/dev/null 2>&1 || true
        rm -rf /var/lib/$NAME /var/lib/private/$NAME
    fi
}
trap cleanup EXIT
snapshot >"$before"
changes() { snapshot >"$after"; comm -13 "$before" "$after"; }

say "dpkg -i $(basename "$deb")"
installed=yes
dpkg -i "$deb"
[ -x /usr/bin/$NAME ] || fail "no /usr/bin/$NAME"
grep -q "^ExecStart=/usr/bin/$NAME run" /lib/systemd/system/$NAME.service \
    || fail "the packaged unit does not run /usr/bin/$NAME"
[ -L /etc/systemd/system/multi-user.target.wants/$NAME.service ] || fail "the unit is not enabled"
dpkg-query -W -f='${Conffiles}\n' "$NAME" | grep " $CONFIG " >/dev/null || fail "$CONFIG is not a conffile"
[ ! -e /var/lib/$NAME ] || fail "installing created the buffer; the service must not have started"
say "installed files:"
dpkg -L "$NAME" | sed 's/^/    /'

say "check on the shipped config must fail: it has no rules yet"
set +e
/usr/bin/$NAME check >"$after" 2>&1
code=$?
set -e
sed 's/^/    /' "$after"
[ "$code" -eq 78 ] || fail "check on the unedited config exited $code, not 78"
grep -q 'no \[\[rules\]\]' "$after" || fail "check did not say the rules are missing"

say "editing the config as a user would: a region and one rule"
sed -i -e 's|^# region = "eu-west-1"|region = "eu-west-1"|' \
    -e 's|^# \[\[rules\]\]|[[rules]]|' \
    -e 's|^# name = "temperature"|name = "temperature"|' \
    -e 's|^# topic = "sensors/+/temperature"|topic = "sensors/+/temperature"|' \
    -e 's|^# function = "ingest-temperature"|function = "ingest-temperature"|' "$CONFIG"
/usr/bin/$NAME check || fail "check refused the edited config"

say "reinstalling: the edited config must survive"
dpkg -i "$deb"
grep -q '^region = "eu-west-1"' "$CONFIG" || fail "reinstalling replaced the edited config"

# What the service leaves when it has run (DynamicUser=yes: systemd keeps the state under
# /var/lib/private and links it): a queued message that must outlive `dpkg -r`.
mkdir -p /var/lib/private/$NAME/temperature
echo queued >/var/lib/private/$NAME/temperature/00000000000000000000.seg
ln -s private/$NAME /var/lib/$NAME

say "dpkg -r $NAME"
dpkg -r "$NAME"
left="$(changes)"
say "left after dpkg -r:"
sed 's/^/    /' <<<"$left"
# deb-systemd-helper remembers that the unit was enabled (for a reinstall) until the purge.
expected="$(printf '%s\n' /etc/$NAME "$CONFIG" /var/lib/$NAME /var/lib/private/$NAME \
    /var/lib/private/$NAME/temperature /var/lib/private/$NAME/temperature/00000000000000000000.seg \
    /var/lib/systemd/deb-systemd-helper-enabled/$NAME.service.dsh-also | sort)"
# /var/lib/private itself may be new on a machine where no DynamicUser service ever ran.
[ "$(grep -vx /var/lib/private <<<"$left")" = "$expected" ] \
    || fail "dpkg -r left more or less than the buffer and the edited config"

say "dpkg -P $NAME"
dpkg -P "$NAME"
left="$(changes | grep -vx /var/lib/private || true)"
[ -z "$left" ] || { sed 's/^/    /' <<<"$left" >&2; fail "dpkg -P left files behind"; }
grep -qx /var/lib/private "$before" || rmdir /var/lib/private 2>/dev/null || true
installed=no
say "dpkg -P left nothing behind"
say "passed"
