#!/usr/bin/env bash
# End-to-end test of the packages (issue 13): builds the .deb and .rpm from
# the binaries in BIN_DIR with packaging/build, then
#
#   .rpm  checks its scripts, file list, config files and requires, and
#         installs it into a throwaway root (rpm --root, --nodeps
#         --noscripts) where rpm -V verifies every file;
#   .deb  dpkg -i on this machine; checks the binaries, units (systemd-analyze
#         verify), configs (conffiles), the system users and state
#         directories, that the binaries load the Swift runtime the package
#         carries (ldd; and they run with the toolchain hidden); runs the
#         INSTALLED gateway as the package's user `leostream` with a static
#         forward to a local echo server and checks random bytes come back
#         unchanged; SIGTERM stops it with exit 0; a changed
#         /etc/leostream-gateway/gateway.conf survives `dpkg --force-confold
#         -i` of the same .deb; dpkg -r removes binaries and units and keeps
#         the config; dpkg -P removes the config and the state directories.
#
# Usage: Tests/e2e/package-install.sh [BIN_DIR]   (default .build/debug)
#   PKG_TEST_VERSION=1 (default) also requires `--version` of every installed
#   binary to exit 0 and print the package's version; PKG_TEST_VERSION=0
#   skips that check, saying so.
# Needs root, dpkg, rpm (rpmbuild), dpkg-dev, patchelf, socat, python3,
# setpriv and unshare (util-linux), ss (iproute2); a missing one fails the
# test, naming it. Refuses to run when the package, its /etc directories or
# its state directories already exist (it would remove them).
# Leaves the machine as it found it: the package purged, the users it
# created deleted, processes stopped, temporary files removed, pass or fail.
# Each check prints `ok - ...` or `FAIL - ...`; exit 0 only when all passed.
# Waits poll with a deadline; nothing depends on how long something took.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=${1:-${LEOSTREAM_BIN_DIR:-$ROOT/.build/debug}}
PKG=remote-desktop-gateway
NAME=package-install
PKG_TEST_VERSION=${PKG_TEST_VERSION:-1}
BINARIES=(leostream-gateway leostream-broker pcoip-security-gateway pcoip-connection-manager pcoip-cmsg-setup)
UNITS=(leostream-gateway.service leostream-broker.service pcoip-security-gateway.service pcoip-connection-manager.service)
USERS=(leostream pcoip)
STATE_DIRS=(/var/lib/leostream-gateway /var/lib/leostream-broker)
ETC_DIRS=(/etc/leostream-gateway /etc/leostream-broker)
GW_CONF=/etc/leostream-gateway/gateway.conf

PASSED=0; FAILED=0
say()   { echo "[$NAME] $*" >&2; }
ok()    { echo "ok - $*"; PASSED=$((PASSED + 1)); }
bad()   { echo "FAIL - $*"; FAILED=$((FAILED + 1)); }
# check DESCRIPTION CMD...: one check; a failure is counted and the test goes on.
# CMD runs in a subshell; what it prints (the reason of a failure) follows the verdict.
verdict() {
    local what=$1 out rc=0; shift
    out=$("$@" 2>&1) || rc=$?
    if [ "$rc" -eq 0 ]; then ok "$what"; else bad "$what"; fi
    if [ -n "$out" ]; then printf '%s\n' "$out"; fi
    return "$rc"
}
check() { verdict "$@" || true; }
# must DESCRIPTION CMD...: a check the rest depends on; a failure ends the test.
must()  { verdict "$@" || exit 1; }

# ---------------------------------------------------------------- preconditions
missing=()
[ "$(id -u)" -eq 0 ] || missing+=("root (dpkg -i; run as root)")
for tool in dpkg dpkg-deb dpkg-query rpm rpmbuild dpkg-shlibdeps patchelf socat python3 setpriv unshare ss ldd cmp timeout setsid getent userdel groupdel systemd-analyze; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
for bin in "${BINARIES[@]}"; do [ -x "$BIN_DIR/$bin" ] || missing+=("$BIN_DIR/$bin (build first: swift build)"); done
if ((${#missing[@]})); then
    for m in "${missing[@]}"; do echo "FAIL - missing: $m"; done
    say "cannot run; scripts/install-deps test installs the packages"
    exit 1
fi
# Purging would delete these: refuse rather than destroy someone's files.
in_the_way=()
if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -qv 'not-installed'; then in_the_way+=("package $PKG (installed or with config files)"); fi
for d in "${ETC_DIRS[@]}" "${STATE_DIRS[@]}"; do if [ -e "$d" ]; then in_the_way+=("$d"); fi; done
if ((${#in_the_way[@]})); then
    for m in "${in_the_way[@]}"; do echo "FAIL - already present, the test would remove it: $m"; done
    exit 1
fi
# Users and groups of the same names that were here before are left alone.
declare -A USER_EXISTED=() GROUP_EXISTED=()
for u in "${USERS[@]}"; do
    if getent passwd "$u" >/dev/null; then USER_EXISTED[$u]=1; fi
    if getent group "$u" >/dev/null; then GROUP_EXISTED[$u]=1; fi
done

# ---------------------------------------------------------------- cleanup
W=$(mktemp -d "/tmp/$NAME.XXXXXX")
# The gateway runs as `leostream` on files in $W: it may traverse, not list.
chmod 711 "$W"
declare -A PIDS=()
cleanup() {
    local rc=$? role pid u
    trap - EXIT INT TERM
    for role in "${!PIDS[@]}"; do
        pid=${PIDS[$role]}
        # Each was started with setsid: its process group is its pid.
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -qv 'not-installed'; then
        say "cleanup: dpkg -P $PKG"
        dpkg -P "$PKG" >"$W/cleanup-purge.log" 2>&1 || { cat "$W/cleanup-purge.log" >&2; say "cleanup: dpkg -P failed"; rc=1; }
    fi
    # The package keeps its users on purge (Debian policy); the test removes
    # the ones it made.
    for u in "${USERS[@]}"; do
        if [ -z "${USER_EXISTED[$u]:-}" ] && getent passwd "$u" >/dev/null; then
            userdel "$u" 2>/dev/null || say "cleanup: userdel $u failed"
        fi
        if [ -z "${GROUP_EXISTED[$u]:-}" ] && getent group "$u" >/dev/null; then
            groupdel "$u" 2>/dev/null || true
        fi
    done
    if [ "$FAILED" -ne 0 ] || [ "$rc" -ne 0 ]; then
        local f
        for f in "$W"/*.log; do
            [ -s "$f" ] || continue
            echo "----- $(basename "$f") (last 30 lines)" >&2
            tail -n 30 "$f" >&2
        done
    fi
    rm -rf "$W"
    if [ "$FAILED" -ne 0 ] || [ "$rc" -ne 0 ]; then
        say "FAILED ($FAILED failed, $PASSED passed, ${SECONDS}s)"
        exit 1
    fi
    say "PASSED ($PASSED checks, ${SECONDS}s)"
    exit 0
}
trap cleanup EXIT
trap 'say "interrupted"; FAILED=$((FAILED + 1)); exit 1' INT TERM

# eventually SECONDS CMD...: polls CMD until it succeeds or the deadline passes.
eventually() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# ---------------------------------------------------------------- build
say "building the packages from $BIN_DIR"
build() { "$ROOT/packaging/build" --bin-dir "$BIN_DIR" --out "$W/out" --fast >"$W/build.out" 2>"$W/build.log"; }
must "packaging/build --bin-dir $BIN_DIR --fast" build
DEB=$(grep '\.deb$' "$W/build.out" || true)
RPM=$(grep '\.rpm$' "$W/build.out" || true)
must "the build printed a .deb and an .rpm that exist" test -f "$DEB" -a -f "$RPM"
VERSION_FULL=$(dpkg-deb -f "$DEB" Version)
UPSTREAM=${VERSION_FULL%%-*}
say "package version $VERSION_FULL"

# ---------------------------------------------------------------- .rpm
rpm -qp --scripts "$RPM" >"$W/rpm-scripts.txt" 2>/dev/null
scripts_have() { local re; for re in "$@"; do grep -qE -- "$re" "$W/rpm-scripts.txt" || { echo "  not in rpm --scripts: $re"; return 1; }; done; }
check "rpm scripts: %post creates the users (useradd -r) and state dirs" \
    scripts_have '^postinstall scriptlet' 'useradd -r' 'install -d -o leostream -g leostream -m 0750'
check "rpm scripts: %preun stops the services on erase only, where systemd runs" \
    scripts_have '^preuninstall scriptlet' '"\$1" -eq 0 .* -d /run/systemd/system' 'disable --now'
rpm -qlp "$RPM" >"$W/rpm-files.txt" 2>/dev/null
rpm_lists() { local f; for f in "$@"; do grep -qx "$f" "$W/rpm-files.txt" || { echo "  not in the rpm: $f"; return 1; }; done; }
check "rpm lists the 5 binaries in /usr/bin" rpm_lists "${BINARIES[@]/#//usr/bin/}"
check "rpm lists the 4 units in /usr/lib/systemd/system" rpm_lists "${UNITS[@]/#//usr/lib/systemd/system/}"
check "rpm lists $GW_CONF and the docs" rpm_lists "$GW_CONF" /usr/share/doc/$PKG/README.md /usr/share/doc/$PKG/gateway.example.conf
noreplace_config() { rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM" 2>/dev/null | grep -qx "cn $1"; }
check "rpm marks $GW_CONF as a config file (noreplace)" noreplace_config "$GW_CONF"
SWIFT_SONAMES='^lib(swift|Foundation|_Foundation|dispatch|BlocksRuntime)'
no_swift_in() { ! rpm -qp "$1" "$RPM" 2>/dev/null | grep -Eq "$SWIFT_SONAMES"; }
check "rpm requires no Swift runtime library (they are carried, private)" no_swift_in --requires
check "rpm provides no Swift runtime library" no_swift_in --provides
# A throwaway root with its own rpm database: the files land there, nothing
# on this machine changes (no scripts, no dependencies: it is a Debian host).
RPMROOT=$W/rpmroot
must "rpm --initdb in a throwaway root" rpm --root "$RPMROOT" --initdb
rpm_install() { rpm -i --root "$RPMROOT" --nodeps --noscripts "$RPM" >"$W/rpm-install.log" 2>&1; }
check "rpm -i --root (--nodeps --noscripts) installs the package" rpm_install
in_rpmroot() { local f; for f in "$@"; do [ -e "$RPMROOT$f" ] || { echo "  missing in the rpm root: $f"; return 1; }; done; }
check "the throwaway root has the binaries, units, config and docs" \
    in_rpmroot "${BINARIES[@]/#//usr/bin/}" "${UNITS[@]/#//usr/lib/systemd/system/}" "$GW_CONF" /usr/share/doc/$PKG/README.md
rpm_verify() { rpm -V --root "$RPMROOT" --nodeps "$PKG" >"$W/rpm-verify.log" 2>&1 || { sed 's/^/  /' "$W/rpm-verify.log"; return 1; }; }
check "rpm -V in the throwaway root: every file as packaged" rpm_verify
rm -rf "$RPMROOT"

# ---------------------------------------------------------------- dpkg -i
conffiles() { [ "$(dpkg-deb -I "$DEB" conffiles | sort | paste -sd' ')" = "/etc/leostream-broker/broker.env $GW_CONF" ]; }
check "deb conffiles: broker.env and $GW_CONF" conffiles
# dpkg [OPTIONS] LOGNAME: dpkg with its output in $W/LOGNAME.log.
dpkg_logged() { local log=${*: -1}; dpkg "${@:1:$#-1}" >"$W/$log.log" 2>&1 </dev/null; }
must "dpkg -i $(basename "$DEB")" dpkg_logged -i "$DEB" dpkg-install
status_is() { [ "$(dpkg-query -W -f='${Status} ${Version}' "$PKG" 2>/dev/null)" = "$1" ]; }
check "dpkg reports the package installed at $VERSION_FULL" status_is "install ok installed $VERSION_FULL"

all_exist() { local f; for f in "$@"; do [ -e "$f" ] || { echo "  missing: $f"; return 1; }; done; }
none_exist() { local f; for f in "$@"; do [ ! -e "$f" ] || { echo "  still there: $f"; return 1; }; done; }
executables() { local f; for f in "$@"; do [ -f "$f" ] && [ -x "$f" ] || { echo "  not an executable file: $f"; return 1; }; done; }
check "the 5 binaries are in /usr/bin, executable" executables "${BINARIES[@]/#//usr/bin/}"
check "the 4 units are in /lib/systemd/system" all_exist "${UNITS[@]/#//lib/systemd/system/}"
# Compared with the copy in the .deb (the source file may have changed since the build).
as_packaged() { dpkg-deb --fsys-tarfile "$DEB" | tar -xO ".$1" | cmp -s - "$1"; }
check "$GW_CONF is installed as packaged" as_packaged "$GW_CONF"
check "$GW_CONF is the example config (same as the doc copy)" cmp -s "$GW_CONF" /usr/share/doc/$PKG/gateway.example.conf
mode_owner() { local got; got=$(stat -c '%a %U:%G' "$1"); [ "$got" = "$2" ] || { echo "  $1: $got, expected $2"; return 1; }; }
check "/etc/leostream-broker/broker.env is 0600 root:root" mode_owner /etc/leostream-broker/broker.env "600 root:root"
check "the docs are in /usr/share/doc/$PKG" \
    all_exist /usr/share/doc/$PKG/README.md /usr/share/doc/$PKG/copyright /usr/share/doc/$PKG/gateway.example.conf /usr/share/doc/$PKG/docs/ARCHITECTURE.md
system_user() {   # NAME: exists, system uid range, no login shell, own group
    local entry uid shell
    entry=$(getent passwd "$1") || { echo "  no user $1"; return 1; }
    uid=$(cut -d: -f3 <<<"$entry"); shell=$(cut -d: -f7 <<<"$entry")
    [ "$uid" -lt 1000 ] || { echo "  $1 has uid $uid (not a system user)"; return 1; }
    case "$shell" in */nologin|*/false) ;; *) echo "  $1 has shell $shell"; return 1 ;; esac
    [ "$(id -gn "$1")" = "$1" ] || { echo "  $1's group is $(id -gn "$1")"; return 1; }
}
for u in "${USERS[@]}"; do check "system user $u exists (uid < 1000, nologin, group $u)" system_user "$u"; done
for d in "${STATE_DIRS[@]}"; do
    check "$d exists, 0750 leostream:leostream" mode_owner "$d" "750 leostream:leostream"
done

# The unit's ExecStartPre, as the unit's user: the installed example config is valid and readable.
unit_check_passes() { runuser -u leostream -- /usr/bin/leostream-gateway --check --config "$GW_CONF" >/dev/null; }
check "as leostream, leostream-gateway --check --config $GW_CONF (the unit's ExecStartPre) passes" unit_check_passes

# The operator's broker settings, run as root as the unit's comment used to
# ask to avoid: the files written into the state directory take its owner,
# so the service's own user can read them.
broker_settings_owned() {
    local key; key=$(mktemp)
    head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=' >"$key"
    /usr/bin/leostream-gateway --broker 192.0.2.1:8080 --gateway-id 7 --control-key-file "$key" \
        --state-dir /var/lib/leostream-gateway >/dev/null || { rm -f "$key"; echo "  --broker ... failed"; return 1; }
    rm -f "$key"
    local f
    for f in /var/lib/leostream-gateway/*; do
        [ "$(stat -c %U "$f")" = leostream ] || { echo "  $f is owned by $(stat -c %U:%G "$f")"; return 1; }
    done
    runuser -u leostream -- cat /var/lib/leostream-gateway/control.key >/dev/null || { echo "  leostream cannot read control.key"; return 1; }
}
check "leostream-gateway --broker/--gateway-id/--control-key-file as root: the state files belong to leostream" broker_settings_owned

# Units: systemd parses them as written (prints nothing when every key is
# known and every value valid; it does not need systemd running).
verify_unit() { local out; out=$(systemd-analyze verify "/lib/systemd/system/$1" 2>&1); [ -z "$out" ] || { sed 's/^/  /' <<<"$out"; return 1; }; }
for unit in "${UNITS[@]}"; do check "systemd-analyze verify $unit: no warning" verify_unit "$unit"; done

# The binaries load the Swift runtime from the package, not from a toolchain.
SWIFT_DIR=$(ldd "$BIN_DIR/leostream-gateway" | awk '$1 == "libswiftCore.so" {print $3}' | xargs -r dirname)
# ldd_private BIN: every library found, none from a toolchain, and (when the
# build links the runtime dynamically) libswiftCore.so from /usr/lib/$PKG.
ldd_private() {
    local out toolchain
    out=$(ldd "/usr/bin/$1") || { echo "  ldd /usr/bin/$1 failed"; return 1; }
    if grep -q 'not found' <<<"$out"; then echo "  $(grep 'not found' <<<"$out" | tr -s ' \t' ' ')"; return 1; fi
    toolchain=$(awk '$2 == "=>" && $3 ~ /\/lib\/swift\/linux\// {print $3}' <<<"$out")
    [ -z "$toolchain" ] || { echo "  from the toolchain: $toolchain"; return 1; }
    [ -z "$SWIFT_DIR" ] || grep -q "libswiftCore.so => /usr/lib/$PKG/libswiftCore.so " <<<"$out" \
        || { echo "  libswiftCore.so is not loaded from /usr/lib/$PKG"; return 1; }
}
for bin in "${BINARIES[@]}"; do
    check "ldd /usr/bin/$bin: all found, the Swift runtime from /usr/lib/$PKG" ldd_private "$bin"
done

# without_toolchain CMD...: runs CMD (as root) in a mount namespace where the
# toolchain's runtime directory is an empty tmpfs, so only the package's
# libraries can be loaded. Without a dynamic runtime there is nothing to hide.
without_toolchain() {
    if [ -n "$SWIFT_DIR" ]; then
        unshare --mount --propagation private sh -c 'mount -t tmpfs -o size=1m,mode=0755 none "$1" && shift && exec "$@"' sh "$SWIFT_DIR" "$@"
    else
        "$@"
    fi
}
if [ -n "$SWIFT_DIR" ]; then say "the toolchain's runtime ($SWIFT_DIR) is hidden when the installed binaries run"; fi
# help_runs BIN: --help prints its usage (a loader failure would print
# "error while loading shared libraries" and exit 127). pcoip-cmsg-setup has
# no --help: it prints the same usage and exits 2.
help_runs() {
    local rc=0
    without_toolchain "/usr/bin/$1" --help >"$W/help-$1.out" 2>&1 || rc=$?
    grep -q '^USAGE: ' "$W/help-$1.out" && { [ "$rc" -eq 0 ] || [ "$1" = pcoip-cmsg-setup ]; } \
        || { echo "  exit $rc: $(head -1 "$W/help-$1.out")"; return 1; }
}
for bin in "${BINARIES[@]}"; do check "/usr/bin/$bin --help runs with the toolchain hidden" help_runs "$bin"; done

if [ "$PKG_TEST_VERSION" = 1 ]; then
    version_prints() {
        local out rc=0
        out=$("/usr/bin/$1" --version 2>&1) || rc=$?
        [ "$rc" -eq 0 ] || { echo "  exit $rc: $(head -1 <<<"$out")"; return 1; }
        grep -qF "$UPSTREAM" <<<"$out" || { echo "  printed: $out"; return 1; }
    }
    for bin in "${BINARIES[@]}"; do check "/usr/bin/$bin --version exits 0 and prints $UPSTREAM" version_prints "$bin"; done
else
    say "skipped: --version checks (PKG_TEST_VERSION=0)"
fi

# ---------------------------------------------------------------- the installed gateway relays
# Two free loopback ports, below the ephemeral range: the echo server's and the forward's.
read -r ECHO_PORT LISTEN_PORT < <(python3 "$ROOT/Tests/e2e/testports.py" 2)
[ -n "$LISTEN_PORT" ] || { echo "package-install: no free ports (Tests/e2e/testports.py)" >&2; exit 1; }
setsid socat TCP-LISTEN:"$ECHO_PORT",bind=127.0.0.1,reuseaddr,fork EXEC:cat >"$W/echo.log" 2>&1 </dev/null &
PIDS[echo]=$!

mkdir -m 0750 "$W/gw" "$W/gw/state"
cat >"$W/gw/gateway.conf" <<EOF
# One static forward to the test's echo server.
drain_timeout = 2s
log_level = info

[forward echo]
listen = 127.0.0.1:$LISTEN_PORT
target = 127.0.0.1:$ECHO_PORT
allow = 127.0.0.0/8
EOF
chown -R root:leostream "$W/gw"; chown leostream:leostream "$W/gw/state"; chmod 0700 "$W/gw/state"; chmod 0640 "$W/gw/gateway.conf"
config_valid() { /usr/bin/leostream-gateway --check --config "$W/gw/gateway.conf" >"$W/check.log" 2>&1; }
check "the test config passes /usr/bin/leostream-gateway --check" config_valid

# As the service would run it: user leostream, no capability, toolchain hidden.
# unshare and sh exec, so the pid is the gateway's.
setsid unshare --mount --propagation private sh -c '
    if [ -n "$1" ]; then mount -t tmpfs -o size=1m,mode=0755 none "$1" || exit 97; fi
    exec setpriv --reuid=leostream --regid=leostream --init-groups --inh-caps=-all --bounding-set=-all \
        /usr/bin/leostream-gateway serve --config "$2" --state-dir "$3"' \
    sh "$SWIFT_DIR" "$W/gw/gateway.conf" "$W/gw/state" >"$W/gateway.log" 2>&1 </dev/null &
GW_PID=$!
PIDS[gateway]=$GW_PID
listening() { kill -0 "$GW_PID" 2>/dev/null && [ -n "$(ss -Hltn "sport = :$LISTEN_PORT")" ]; }
echo_listening() { [ -n "$(ss -Hltn "sport = :$ECHO_PORT")" ]; }
must "the echo server listens on 127.0.0.1:$ECHO_PORT (polled up to 60 s)" eventually 60 echo_listening
must "the installed gateway listens on 127.0.0.1:$LISTEN_PORT (polled up to 60 s)" eventually 60 listening
runs_as() { local who; who=$(ps -o user= -p "$GW_PID"); [ "$who" = "$1" ] || { echo "  runs as '$who'"; return 1; }; }
check "the gateway runs as leostream" runs_as leostream

head -c 262144 /dev/urandom >"$W/sent"
# socat sends the file, half-closes, and reads until the echo side closes.
timeout 60 socat -t 20 - TCP:127.0.0.1:"$LISTEN_PORT" <"$W/sent" >"$W/received" 2>"$W/client.log" || true
same_bytes() { cmp -s "$1" "$2"; }
check "256 KiB of random bytes come back unchanged through the gateway ($(stat -c %s "$W/received") bytes back)" \
    same_bytes "$W/sent" "$W/received"
# Negative control: the same comparison must see one flipped byte.
python3 -c 'import sys; d = bytearray(open(sys.argv[1], "rb").read()); d[1000] ^= 0xFF; open(sys.argv[2], "wb").write(d)' "$W/sent" "$W/altered"
differs() { ! same_bytes "$1" "$2"; }
check "negative control: one flipped byte is seen as a difference" differs "$W/sent" "$W/altered"

kill -TERM "$GW_PID"
gone() { ! kill -0 "$GW_PID" 2>/dev/null; }
check "SIGTERM stops the gateway (polled up to 60 s)" eventually 60 gone
gw_rc=0; wait "$GW_PID" || gw_rc=$?
unset "PIDS[gateway]"
check "the gateway exits 0 on SIGTERM (got $gw_rc)" test "$gw_rc" -eq 0

# ---------------------------------------------------------------- reinstall keeps a changed config
TOKEN="local change $$-$RANDOM"
echo "# $TOKEN" >>"$GW_CONF"
must "dpkg --force-confold -i the same .deb again" dpkg_logged --force-confold -i "$DEB" dpkg-reinstall
check "the changed $GW_CONF is kept" grep -qF "# $TOKEN" "$GW_CONF"
check "no .dpkg-dist/.dpkg-new beside it" none_exist "$GW_CONF.dpkg-dist" "$GW_CONF.dpkg-new"

# ---------------------------------------------------------------- dpkg -r
must "dpkg -r $PKG" dpkg_logged -r "$PKG" dpkg-remove
check "dpkg -r: the binaries are gone" none_exist "${BINARIES[@]/#//usr/bin/}"
check "dpkg -r: the units and /usr/lib/$PKG are gone" none_exist "${UNITS[@]/#//lib/systemd/system/}" "/usr/lib/$PKG"
check "dpkg -r: the config is kept (with the local change)" grep -qF "# $TOKEN" "$GW_CONF"
check "dpkg -r: the state directories are kept" all_exist "${STATE_DIRS[@]}"
check "dpkg -r: the package is in state config-files" status_is "deinstall ok config-files $VERSION_FULL"

# ---------------------------------------------------------------- dpkg -P
must "dpkg -P $PKG" dpkg_logged -P "$PKG" dpkg-purge
check "dpkg -P: the configs and /etc directories are gone" none_exist "${ETC_DIRS[@]}"
check "dpkg -P: the state directories are gone" none_exist "${STATE_DIRS[@]}"
known() { dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null | grep -qv 'not-installed'; }
forgotten() { ! known; }
check "dpkg -P: dpkg no longer knows the package" forgotten
