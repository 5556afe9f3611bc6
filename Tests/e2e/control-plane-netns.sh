#!/usr/bin/env bash
# End-to-end test of the control plane (issue 4) across network namespaces
# that this script creates and always deletes.
#
#   client A 10.99.1.10 ─┐                          ┌─ broker  10.99.2.2:8080
#   client B 10.99.1.11 ─┤ public 10.99.1.0/24      │  private 10.99.2.0/24
#                        └─ 10.99.1.1 [gateway] 10.99.2.1 ─┤
#                                                   └─ desktop 10.99.2.3
#                                                        sshd :2222, echo :7007
#
# The two networks are bridges in a sixth namespace (the switch). The real
# binaries run in their hosts: leostream-broker (REST API, enrollment,
# connect), leostream-gateway serve (control endpoint on the private side,
# broker forwarding on 10.99.1.1:443, pushed rules on the public side), and
# on the desktop OpenSSH's sshd (throwaway host key) and a socat echo service.
#
# Flow: the admin creates the gateway, a desktop and a user, and enrolls the
# gateway; the gateway is given --broker/--gateway-id/--control-key-file and
# registers; A logs in and connects through the gateway's broker forwarding
# and reaches the desktop's sshd (banner SSH-2.0-) on the port it was given,
# for use_src_ip 0, 1 and 2; B is refused on A's rule for 1 and 2; disconnect
# closes the rule; the gateway restarts and A's rule still works (B still
# refused); the broker stops and A's live echo session keeps carrying bytes;
# a second gateway joins and a cluster with load_balance_via E opens each
# connection on both (same port, both reach sshd, disconnect closes both);
# the gateway is upgraded in place (SIGUSR2) with A's sessions live;
# the gateway is frozen (SIGSTOP) and the broker marks it offline and stops
# choosing it; thawed, it comes back online. Then the broker's SQLite data
# is copied into PostgreSQL (switch-database) and two brokers serve from it:
# gateways register with either, concurrent connects on both never share a
# port, and a silent gateway is marked offline once for the cluster.
#
# Usage: Tests/e2e/control-plane-netns.sh [BIN_DIR]
#   BIN_DIR holds leostream-broker and leostream-gateway (default: the
#   LEOSTREAM_BIN_DIR environment variable, else .build/debug).
# Needs root, iproute2 (ip), curl, jq, socat, openssl, sshd and ssh-keygen
# (openssh-server); a missing one fails the test, naming it.
# Exit 0 when every check passed, 1 otherwise (logs are printed on failure).
# Waits poll with a deadline; no check depends on how long something took.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=${1:-${LEOSTREAM_BIN_DIR:-$ROOT/.build/debug}}
BROKER_BIN=$BIN_DIR/leostream-broker
GATEWAY_BIN=$BIN_DIR/leostream-gateway
NAME=control-plane-netns

say()  { echo "[$NAME] $*" >&2; }
pass() { echo "[$NAME] ok: $*" >&2; PASSED=$((PASSED + 1)); }
PASSED=0

# ---------------------------------------------------------------- preconditions
missing=()
[ "$(id -u)" -eq 0 ] || missing+=("root (network namespaces need CAP_NET_ADMIN; run as root)")
for tool in ip ping curl jq socat openssl ssh-keygen setsid timeout; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
SSHD=$(command -v sshd 2>/dev/null || echo /usr/sbin/sshd)
[ -x "$SSHD" ] || missing+=("sshd (Debian package openssh-server)")
[ -x "$BROKER_BIN" ] || missing+=("$BROKER_BIN (build first: swift build)")
[ -x "$GATEWAY_BIN" ] || missing+=("$GATEWAY_BIN (build first: swift build)")
if ((${#missing[@]})); then
    for m in "${missing[@]}"; do echo "[$NAME] FAIL: missing: $m" >&2; done
    echo "[$NAME] FAIL: cannot run; scripts/install-deps test installs the packages" >&2
    exit 1
fi

# ---------------------------------------------------------------- hosts and cleanup
TAG="lcp$$"
NS_SW=$TAG-sw; NS_A=$TAG-a; NS_B=$TAG-b; NS_GW=$TAG-gw; NS_BR=$TAG-br; NS_DK=$TAG-dk
ALL_NS=("$NS_A" "$NS_B" "$NS_GW" "$NS_BR" "$NS_DK" "$NS_SW")
A_IP=10.99.1.10; B_IP=10.99.1.11; GW_PUB=10.99.1.1; GW_PRIV=10.99.2.1; BR_IP=10.99.2.2; DK_IP=10.99.2.3
BROKER_URL=https://$BR_IP:8080
# The gateway's broker forwarding (L4 + PROXY v2): TLS end to end with the
# broker, whose certificate names broker.e2e (resolved to the gateway's public address).
FORWARD_URL=https://broker.e2e:443
BR2_IP=10.99.2.7
SSH_PORT=2222; ECHO_PORT=7007; UDP_ECHO_PORT=7008

# W, PIDS, FAILED; stop_role, show_logs, cleanup (the traps), fail, in_ns,
# start, alive, eventually, make_namespaces, plug.
source "$(dirname "${BASH_SOURCE[0]}")/netns-lib.sh"

# ---------------------------------------------------------------- topology
make_namespaces
plug "$NS_A"  eth0 $A_IP/24   br-pub  p-a
plug "$NS_B"  eth0 $B_IP/24   br-pub  p-b
plug "$NS_GW" pub0 $GW_PUB/24 br-pub  p-gw
plug "$NS_GW" priv0 $GW_PRIV/24 br-priv q-gw
plug "$NS_BR" eth0 $BR_IP/24  br-priv q-br
plug "$NS_DK" eth0 $DK_IP/24  br-priv q-dk
# The public side cannot reach the private network except through the gateway's relays.
reaches() { in_ns "$1" ping -c1 -W1 "$2" >/dev/null 2>&1; }   # NS ADDRESS
eventually 10 "client A cannot reach the gateway's public address" reaches "$NS_A" $GW_PUB
eventually 10 "client B cannot reach the gateway's public address" reaches "$NS_B" $GW_PUB
eventually 10 "the gateway cannot reach the broker" reaches "$NS_GW" $BR_IP
eventually 10 "the gateway cannot reach the desktop" reaches "$NS_GW" $DK_IP
reaches "$NS_A" $DK_IP && fail "client A reaches the desktop directly (the networks are not separate)"
pass "topology: A, B -> gateway public; gateway private -> broker, desktop; A cannot reach the desktop"

# ---------------------------------------------------------------- desktop: sshd and echo
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh_host_ed25519_key" -C e2e-throwaway || fail "ssh-keygen"
cat >"$W/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress $DK_IP
HostKey $W/ssh_host_ed25519_key
PidFile $W/sshd.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
EOF
mkdir -p /run/sshd && chmod 755 /run/sshd   # sshd's privilege separation directory
"$SSHD" -t -f "$W/sshd_config" 2>"$W/sshd-check.log" || fail "sshd -t: $(cat "$W/sshd-check.log")"
start sshd "$NS_DK" "$SSHD" -D -e -f "$W/sshd_config"
start echo "$NS_DK" socat "TCP-LISTEN:$ECHO_PORT,bind=$DK_IP,reuseaddr,fork" EXEC:cat
start uecho "$NS_DK" socat "UDP4-RECVFROM:$UDP_ECHO_PORT,bind=$DK_IP,fork" EXEC:cat

# banner NS IP PORT: prints the first line the server sends (empty when refused or closed).
banner() {
    in_ns "$1" timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2" || exit 1
        IFS= read -r -t 4 line <&3 && printf "%s\n" "$line"' banner "$2" "$3" 2>/dev/null
}
has_banner() { [[ "$(banner "$@")" == SSH-2.0-* ]]; }
eventually 20 "sshd on the desktop did not answer with an SSH banner" has_banner "$NS_GW" $DK_IP $SSH_PORT
pass "desktop: sshd on $DK_IP:$SSH_PORT answers SSH-2.0-"

# ---------------------------------------------------------------- broker
ADMIN_PASSWORD=$(openssl rand -hex 16)
USER_PASSWORD=$(openssl rand -hex 16)
( umask 077; printf '%s\n' "$ADMIN_PASSWORD" >"$W/admin-password" )
# TLS by default: the broker makes a self-signed certificate in its data
# folder, naming its address, broker.e2e and the second broker host's address
# (the cluster at the end shares it). Clients trust only it (--cacert).
BROKER_ARGS=(--data-dir "$W/broker-data" --listen $BR_IP:8080 --admin-password-file "$W/admin-password"
             --tls-name broker.e2e --tls-name $BR2_IP --bcrypt-cost 4 --heartbeat-interval 1 --offline-after 3)
BROKER_CA=$W/broker-data/broker-tls.crt
start broker "$NS_BR" "$BROKER_BIN" "${BROKER_ARGS[@]}"
broker_up() { in_ns "$NS_BR" curl -s -o /dev/null -m 2 --cacert "$BROKER_CA" "$BROKER_URL/v1/system/health"; }
eventually 30 "the broker did not start listening on $BR_IP:8080" broker_up

# http NS METHOD URL [BODY] [TOKEN]: sets STATUS and BODY. The token goes in a
# header file, never on a command line or in the output.
http() {
    local ns=$1 method=$2 url=$3 body=${4:-} token=${5:-}
    local args=(-s -m 15 -X "$method" -o "$W/http.body" -w '%{http_code}' --cacert "$BROKER_CA" --resolve "broker.e2e:443:$GW_PUB")
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data-binary "$body")
    if [ -n "$token" ]; then
        ( umask 077; printf 'Authorization: Bearer %s\n' "$token" >"$W/auth.header" )
        args+=(-H "@$W/auth.header")
    fi
    STATUS=$(in_ns "$ns" curl "${args[@]}" "$url") || STATUS=${STATUS:-000}
    BODY=$(cat "$W/http.body" 2>/dev/null || true)
    rm -f "$W/http.body" "$W/auth.header"
}
expect() {   # STATUS WHAT
    [ "$STATUS" = "$1" ] || fail "$2: expected HTTP $1, got $STATUS: $BODY"
}
login() {    # NS URL LOGIN PASSWORD -> prints the sid
    http "$1" POST "$2/v1/session/login" "$(jq -cn --arg l "$3" --arg p "$4" '{user_login: $l, password: $p}')"
    expect 200 "login of $3 at $2"
    jq -er .sid <<<"$BODY" || fail "login of $3: no sid in the answer"
}

ADMIN_SID=$(login "$NS_BR" "$BROKER_URL" admin "$ADMIN_PASSWORD") || exit 1
http "$NS_BR" POST "$BROKER_URL/v1/gateways" \
    "{\"name\":\"gw-e2e\",\"address\":\"$GW_PUB\",\"address_private\":\"$GW_PRIV\",\"use_src_ip\":0}" "$ADMIN_SID"
[[ "$STATUS" == 20[01] ]] || fail "create the gateway: HTTP $STATUS: $BODY"
GW_ID=$(jq -er '.stored_data.id // .id' <<<"$BODY") || fail "create the gateway: no id in $BODY"
http "$NS_BR" POST "$BROKER_URL/v1/desktops" \
    "{\"name\":\"desk-e2e\",\"address\":\"$DK_IP\",\"gateway_id\":$GW_ID,\"protocols\":[{\"name\":\"ssh\",\"port\":$SSH_PORT},{\"name\":\"echo\",\"port\":$ECHO_PORT},{\"name\":\"uecho\",\"port\":$UDP_ECHO_PORT,\"transport\":\"udp\"}]}" "$ADMIN_SID"
[[ "$STATUS" == 20[01] ]] || fail "create the desktop: HTTP $STATUS: $BODY"
DESK_ID=$(jq -er '.stored_data.id // .id' <<<"$BODY") || fail "create the desktop: no id in $BODY"
http "$NS_BR" POST "$BROKER_URL/v1/users" "$(jq -cn --arg p "$USER_PASSWORD" '{login: "alice", password: $p, role: "user"}')" "$ADMIN_SID"
[[ "$STATUS" == 20[01] ]] || fail "create user alice: HTTP $STATUS: $BODY"
# Enrollment: the control key is written straight to a 0600 file, never shown.
http "$NS_BR" POST "$BROKER_URL/v1/gateways/$GW_ID/enrollment" "" "$ADMIN_SID"
expect 201 "enroll the gateway"
( umask 077; jq -er .control_key <<<"$BODY" >"$W/control-key" ) || fail "enrollment answered no control_key"
BODY=""
pass "admin: gateway $GW_ID, desktop $DESK_ID and user created, gateway enrolled"

gateway_online() {   # [ID]: prints true/false for gateway ID (default: the first gateway)
    http "$NS_BR" GET "$BROKER_URL/v1/gateways/${1:-$GW_ID}" "" "$ADMIN_SID"
    [ "$STATUS" = 200 ] || return 1
    jq -r '(.stored_data // .) | .online' <<<"$BODY"
}
is_online()  { [ "$(gateway_online "$@")" = true ]; }
is_offline() { [ "$(gateway_online)" = false ]; }
set_method() {
    http "$NS_BR" PUT "$BROKER_URL/v1/gateways/$GW_ID" "{\"use_src_ip\":$1}" "$ADMIN_SID"
    expect 200 "set use_src_ip $1"
}

# ---------------------------------------------------------------- gateway
cat >"$W/gateway.conf" <<EOF
loops = 1
drain_timeout = 2s
log_level = info
control_listen = $GW_PRIV:19010
public_address = $GW_PUB
desktop_networks = 10.99.2.0/24
broker_forward_listen = $GW_PUB:443
gateway_signature = e2e-gateway
EOF
GW_STATE=$W/gateway-state
in_ns "$NS_GW" "$GATEWAY_BIN" --check --config "$W/gateway.conf" >"$W/gateway-check.log" 2>&1 \
    || fail "gateway --check: $(cat "$W/gateway-check.log")"
in_ns "$NS_GW" "$GATEWAY_BIN" --state-dir "$GW_STATE" --broker https://$BR_IP:8080 --gateway-id "$GW_ID" \
    --control-key-file "$W/control-key" --port-range 21000-21999 >"$W/gateway-configure.log" 2>&1 \
    || fail "gateway --broker ...: $(cat "$W/gateway-configure.log")"
grep -qF -e "$(cat "$W/control-key")" "$W/gateway-configure.log" && fail "the gateway printed its control key"
# Enrollment pinned the broker's certificate: the hash it printed is the one the broker logged.
BROKER_FP=$(openssl x509 -noout -fingerprint -sha256 -in "$BROKER_CA" | sed 's/^sha256 Fingerprint=/SHA256:/I')
grep -qF "pinned the broker's certificate $BROKER_FP" "$W/gateway-configure.log" \
    || fail "the gateway did not pin the broker's certificate $BROKER_FP: $(cat "$W/gateway-configure.log")"
grep -qF "certificate $BROKER_FP" "$W/broker.log" || fail "the broker did not log its certificate's hash $BROKER_FP"
pass "enrollment pinned the broker's certificate ($BROKER_FP, as the broker logs it)"
# From a copy of its own: the hot upgrade below replaces the file.
mkdir -p "$W/bin" && cp "$GATEWAY_BIN" "$W/bin/leostream-gateway"
start_gateway() { start gateway "$NS_GW" "$W/bin/leostream-gateway" serve --config "$W/gateway.conf" --state-dir "$GW_STATE"; }
start_gateway
eventually 60 "the gateway did not register (GET /v1/gateways/$GW_ID never showed online true)" is_online
in_ns "$NS_GW" "$GATEWAY_BIN" --status --state-dir "$GW_STATE" >"$W/status.out" 2>&1 || fail "gateway --status: $(cat "$W/status.out")"
grep -q "gateway id:      $GW_ID" "$W/status.out" || fail "gateway --status does not show gateway id $GW_ID: $(cat "$W/status.out")"
grep -qF -e "$(cat "$W/control-key")" "$W/status.out" && fail "gateway --status printed the control key"
pass "gateway registered with the broker (online true); --status shows it without the key"

# ---------------------------------------------------------------- A through broker forwarding
ALICE_SID=$(login "$NS_A" "$FORWARD_URL" alice "$USER_PASSWORD") || exit 1
pass "A logged in to the broker through the gateway's broker forwarding ($GW_PUB:443)"
# B reaches the same forwarding port: the refusals below are the rules', not the network's.
http "$NS_B" GET "$FORWARD_URL/v1/system/health"
[ "$STATUS" != 000 ] || fail "B cannot reach the gateway's broker forwarding port"

connect() {  # PROTOCOL -> sets RULE_ID, PORT, ADDRESS
    http "$NS_A" POST "$FORWARD_URL/v1/connect" "{\"desktop_id\":$DESK_ID,\"protocol\":\"$1\"}" "$ALICE_SID"
    expect 200 "POST /v1/connect ($1) through broker forwarding"
    RULE_ID=$(jq -er .rule_id <<<"$BODY") && PORT=$(jq -er .port <<<"$BODY") && ADDRESS=$(jq -er .address <<<"$BODY") \
        || fail "connect answer lacks rule_id/port/address: $BODY"
    [ "$ADDRESS" = "$GW_PUB" ] || fail "connect answered address $ADDRESS, not the gateway's $GW_PUB"
}

# use_src_ip 0: a random port of the range, open to anyone.
connect ssh
M0_RULE=$RULE_ID; M0_PORT=$PORT
[ "$PORT" -ge 21000 ] && [ "$PORT" -le 21999 ] || fail "method 0 port $PORT is outside --port-range 21000-21999"
has_banner "$NS_A" "$ADDRESS" "$PORT" || fail "method 0: A got no SSH banner through $ADDRESS:$PORT"
has_banner "$NS_B" "$ADDRESS" "$PORT" || fail "method 0: B got no SSH banner through $ADDRESS:$PORT (the rule is open to anyone)"
pass "use_src_ip 0: A reaches the desktop's sshd through $ADDRESS:$PORT (anyone may)"

# Disconnect removes the rule on the gateway.
http "$NS_A" DELETE "$FORWARD_URL/v1/connect/$M0_RULE" "" "$ALICE_SID"
expect 204 "DELETE /v1/connect/$M0_RULE"
has_banner "$NS_A" "$GW_PUB" "$M0_PORT" && fail "after DELETE /v1/connect the port $M0_PORT still reaches the desktop"
pass "disconnect: the rule is gone, port $M0_PORT no longer reaches the desktop"

# use_src_ip 1: the protocol's own port, only for A's address (taken from the PROXY v2 header).
set_method 1
connect ssh
[ "$PORT" = "$SSH_PORT" ] || fail "method 1 answered port $PORT, not the protocol's own $SSH_PORT"
has_banner "$NS_A" "$ADDRESS" "$PORT" || fail "method 1: A got no SSH banner through $ADDRESS:$PORT"
has_banner "$NS_B" "$ADDRESS" "$PORT" && fail "method 1: B reached the desktop on A's rule ($ADDRESS:$PORT)"
pass "use_src_ip 1: A reaches sshd on $ADDRESS:$PORT, B is refused"

# use_src_ip 2: a random port, only for A's address.
set_method 2
connect ssh
M2_RULE=$RULE_ID; M2_PORT=$PORT
[ "$PORT" -ge 21000 ] && [ "$PORT" -le 21999 ] || fail "method 2 port $PORT is outside --port-range 21000-21999"
has_banner "$NS_A" "$ADDRESS" "$PORT" || fail "method 2: A got no SSH banner through $ADDRESS:$PORT"
has_banner "$NS_B" "$ADDRESS" "$PORT" && fail "method 2: B reached the desktop on A's rule ($ADDRESS:$PORT)"
pass "use_src_ip 2: A reaches sshd on $ADDRESS:$PORT, B is refused"

# ---------------------------------------------------------------- gateway restart
say "restarting the gateway (SIGTERM, then serve again)"
stop_role gateway TERM
has_banner "$NS_A" "$GW_PUB" "$M2_PORT" && fail "port $M2_PORT still answers with the gateway stopped"
start_gateway
eventually 60 "after its restart the gateway's rule on port $M2_PORT never reached the desktop again" \
    has_banner "$NS_A" "$GW_PUB" "$M2_PORT"
has_banner "$NS_B" "$GW_PUB" "$M2_PORT" && fail "after the restart B reaches the desktop on A's rule"
eventually 60 "the restarted gateway did not register again" is_online
STATUS=$(in_ns "$NS_GW" curl -s -m 10 -o /dev/null -w '%{http_code}' --cacert "$GW_STATE/control-tls.crt" "https://$GW_PRIV:19010/control/v1/rules/$M2_RULE") || true
[ "$STATUS" = 401 ] || fail "an unsigned GET of the control endpoint answered $STATUS, not 401"
in_ns "$NS_GW" curl -s -m 10 -o /dev/null "http://$GW_PRIV:19010/control/v1/rules/$M2_RULE" 2>/dev/null \
    && fail "the control endpoint answered plain HTTP"
in_ns "$NS_GW" curl -s -m 10 -o /dev/null "https://$GW_PRIV:19010/health" 2>/dev/null \
    && fail "a client trusting only the system's CAs accepted the control endpoint's self-signed certificate"
pass "gateway restart: A's rule ($M2_RULE) restored and still works, B still refused; the control endpoint speaks TLS only (its own certificate), unsigned calls refused"

# ---------------------------------------------------------------- broker outage
set_method 0
connect uecho
UDP_RULE_PORT=$PORT
# A's UDP flow: every datagram from the same source port (one flow on the gateway).
udp_exchange() {   # TEXT: one datagram through the gateway, echoed
    in_ns "$NS_A" python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 40444))
s.settimeout(5)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
data, _ = s.recvfrom(2048)
sys.exit(0 if data.decode().strip() == sys.argv[3] else 1)' "$GW_PUB" "$UDP_RULE_PORT" "$1" 2>/dev/null
}
eventually 20 "A's UDP flow through $GW_PUB:$UDP_RULE_PORT did not echo" udp_exchange "udp-before-the-outage"
connect echo
ECHO_RULE_PORT=$PORT
coproc LIVE { exec ip netns exec "$NS_A" socat - "TCP:$GW_PUB:$ECHO_RULE_PORT" 2>>"$W/live-session.log"; }
LIVE_CHILD=$LIVE_PID
exchange() {   # sends a line on A's live session and expects it echoed
    printf '%s\n' "$1" >&"${LIVE[1]}" || return 1
    local line
    IFS= read -r -t 10 line <&"${LIVE[0]}" || return 1
    [ "$line" = "$1" ]
}
exchange "before-the-outage" || fail "A's echo session through $GW_PUB:$ECHO_RULE_PORT did not echo"
stop_role broker TERM
broker_up && fail "the broker still answers after SIGTERM"
for i in 1 2 3; do
    exchange "during-the-outage-$i" || fail "A's live session stopped carrying bytes once the broker was down (line $i)"
    udp_exchange "udp-during-the-outage-$i" || fail "A's UDP flow stopped once the broker was down (datagram $i)"
done
http "$NS_A" POST "$FORWARD_URL/v1/connect" "{\"desktop_id\":$DESK_ID,\"protocol\":\"ssh\"}" "$ALICE_SID"
[ "$STATUS" = 200 ] && fail "a connect call succeeded while the broker was down"
pass "broker outage: A's live TCP session and UDP flow keep carrying data; no new connection is made"
kill "$LIVE_CHILD" 2>/dev/null; wait "$LIVE_CHILD" 2>/dev/null

start broker "$NS_BR" "$BROKER_BIN" "${BROKER_ARGS[@]}"
eventually 30 "the broker did not restart" broker_up
ADMIN_SID=$(login "$NS_BR" "$BROKER_URL" admin "$ADMIN_PASSWORD") || exit 1
eventually 60 "the gateway did not register again after the broker came back" is_online
udp_exchange "udp-after-the-outage" || fail "A's UDP flow stopped after the broker came back (its rule was not kept)"
pass "the broker is back, the gateway registered again and kept the rules (A's UDP flow still echoes)"

# ---------------------------------------------------------------- gateway hot upgrade
# The binary file is replaced and SIGUSR2 hands every socket to the new one:
# A's live TCP session and UDP flow carry on, the new process registers,
# serves the control endpoint and opens new rules.
say "upgrading the gateway in place (new binary file, SIGUSR2)"
coproc LIVE { exec ip netns exec "$NS_A" socat - "TCP:$GW_PUB:$ECHO_RULE_PORT" 2>>"$W/live-session.log"; }
LIVE_CHILD=$LIVE_PID
exchange "before-the-upgrade" || fail "A's echo session through $GW_PUB:$ECHO_RULE_PORT did not echo before the upgrade"
udp_exchange "udp-before-the-upgrade" || fail "A's UDP flow did not echo before the upgrade"
OLD_GW_PID=$(cat "$GW_STATE/gateway.pid")
cp "$GATEWAY_BIN" "$W/bin/leostream-gateway.new" && mv -f "$W/bin/leostream-gateway.new" "$W/bin/leostream-gateway"
kill -USR2 "$OLD_GW_PID"
took_over() {   # the pid file names a live process other than the old one
    local p
    p=$(cat "$GW_STATE/gateway.pid" 2>/dev/null) && [ -n "$p" ] && [ "$p" != "$OLD_GW_PID" ] && kill -0 "$p" 2>/dev/null
}
old_gone() { ! kill -0 "$OLD_GW_PID" 2>/dev/null; }
eventually 60 "no new gateway process took over from pid $OLD_GW_PID" took_over
eventually 30 "the old gateway (pid $OLD_GW_PID) did not exit after the handover" old_gone
grep -q "upgrade: took over [1-9][0-9]* connection(s) and [1-9][0-9]* UDP flow(s) from pid $OLD_GW_PID" "$W/gateway.log" \
    || fail "the new gateway did not say it took over A's connection and flow from pid $OLD_GW_PID"
for i in 1 2 3; do
    exchange "after-the-upgrade-$i" || fail "A's live session stopped carrying bytes after the upgrade (line $i)"
    udp_exchange "udp-after-the-upgrade-$i" || fail "A's UDP flow stopped after the upgrade (datagram $i)"
done
registered_again() { jq -e --arg pid "$(cat "$GW_STATE/gateway.pid")" '.pid == ($pid | tonumber) and .registration.state == "registered"' "$GW_STATE/status.json" >/dev/null 2>&1; }
eventually 60 "the upgraded gateway did not register with the broker" registered_again
connect ssh
eventually 30 "a rule pushed to the upgraded gateway (port $PORT) did not reach sshd" has_banner "$NS_A" "$GW_PUB" "$PORT"
kill "$LIVE_CHILD" 2>/dev/null; wait "$LIVE_CHILD" 2>/dev/null
pass "hot upgrade: the new binary (pid $(cat "$GW_STATE/gateway.pid")) took over; A's live TCP session and UDP flow carried on, it registered and a new rule works"

# ---------------------------------------------------------------- cluster mode E
# A second gateway joins; a cluster with load_balance_via E puts each rule on
# every gateway of the cluster (behind an external load balancer, whichever
# gateway the client lands on must carry it), on the same port.
NS_GW2=$TAG-gw2; ALL_NS+=("$NS_GW2")
GW2_PUB=10.99.1.2; GW2_PRIV=10.99.2.4
ip netns add "$NS_GW2" || fail "ip netns add $NS_GW2"
ip -n "$NS_GW2" link set lo up
plug "$NS_GW2" pub0 $GW2_PUB/24 br-pub p-gw2
plug "$NS_GW2" priv0 $GW2_PRIV/24 br-priv q-gw2
http "$NS_BR" POST "$BROKER_URL/v1/gateway-clusters" '{"name":"cl-every","address":"lb.e2e.example","load_balance_via":"E","use_src_ip":0}' "$ADMIN_SID"
[[ "$STATUS" == 20[01] ]] || fail "create the E cluster: HTTP $STATUS: $BODY"
CLUSTER_ID=$(jq -er '.stored_data.id // .id' <<<"$BODY") || fail "create the cluster: no id in $BODY"
http "$NS_BR" POST "$BROKER_URL/v1/gateways" \
    "{\"name\":\"gw2-e2e\",\"address\":\"$GW2_PUB\",\"address_private\":\"$GW2_PRIV\",\"load_balancer_id\":$CLUSTER_ID}" "$ADMIN_SID"
[[ "$STATUS" == 20[01] ]] || fail "create the second gateway: HTTP $STATUS: $BODY"
GW2_ID=$(jq -er '.stored_data.id // .id' <<<"$BODY") || fail "create the second gateway: no id in $BODY"
http "$NS_BR" PUT "$BROKER_URL/v1/gateways/$GW_ID" "{\"load_balancer_id\":$CLUSTER_ID}" "$ADMIN_SID"
expect 200 "put gateway $GW_ID in the cluster"
http "$NS_BR" POST "$BROKER_URL/v1/gateways/$GW2_ID/enrollment" "" "$ADMIN_SID"
expect 201 "enroll the second gateway"
( umask 077; jq -er .control_key <<<"$BODY" >"$W/control-key-2" ) || fail "enrollment answered no control_key"
BODY=""
sed -e "s/$GW_PRIV/$GW2_PRIV/; s/$GW_PUB/$GW2_PUB/g; s/e2e-gateway/e2e-gateway-2/" "$W/gateway.conf" >"$W/gateway2.conf"
# A wrong certificate is refused: gateway 2 first pins a hash that is not the broker's.
WRONG_FP=SHA256:$(printf '00:%.0s' $(seq 31))00
in_ns "$NS_GW2" "$GATEWAY_BIN" --state-dir "$W/gateway2-state" --broker https://$BR_IP:8080 --gateway-id "$GW2_ID" \
    --control-key-file "$W/control-key-2" --broker-fingerprint "$WRONG_FP" --port-range 21000-21999 >"$W/gateway2-configure.log" 2>&1 \
    || fail "second gateway --broker ... --broker-fingerprint: $(cat "$W/gateway2-configure.log")"
start gateway2 "$NS_GW2" "$GATEWAY_BIN" serve --config "$W/gateway2.conf" --state-dir "$W/gateway2-state"
refused_pin() { grep -q "not the one pinned at enrollment" "$W/gateway2.log"; }
eventually 60 "gateway 2 with a wrong pin did not report the broker's certificate as not the one pinned" refused_pin
is_online "$GW2_ID" && fail "gateway 2 registered although the broker's certificate is not the one it pinned"
stop_role gateway2 TERM
in_ns "$NS_GW2" "$GATEWAY_BIN" --state-dir "$W/gateway2-state" --broker https://$BR_IP:8080 --gateway-id "$GW2_ID" \
    --control-key-file "$W/control-key-2" --broker-ca "$BROKER_CA" --port-range 21000-21999 >>"$W/gateway2-configure.log" 2>&1 \
    || fail "second gateway --broker ... --broker-ca: $(cat "$W/gateway2-configure.log")"
start gateway2 "$NS_GW2" "$GATEWAY_BIN" serve --config "$W/gateway2.conf" --state-dir "$W/gateway2-state"
eventually 60 "the second gateway (trusting the broker's CA) did not register" is_online "$GW2_ID"
pass "a wrong pinned certificate is refused (never registered); with --broker-ca the same gateway registers"
http "$NS_BR" POST "$BROKER_URL/v1/desktops" \
    "{\"name\":\"desk-cluster\",\"address\":\"$DK_IP\",\"load_balancer_id\":$CLUSTER_ID,\"protocols\":[{\"name\":\"ssh\",\"port\":$SSH_PORT}]}" "$ADMIN_SID"
[[ "$STATUS" == 20[01] ]] || fail "create the cluster's desktop: HTTP $STATUS: $BODY"
DESK2_ID=$(jq -er '.stored_data.id // .id' <<<"$BODY") || fail "create the cluster's desktop: no id in $BODY"
http "$NS_BR" POST "$BROKER_URL/v1/connect" "{\"desktop_id\":$DESK2_ID,\"protocol\":\"ssh\"}" "$ADMIN_SID"
expect 200 "connect through the E cluster"
E_RULE=$(jq -er .rule_id <<<"$BODY") && E_PORT=$(jq -er .port <<<"$BODY") || fail "E connect answer: $BODY"
[ "$(jq -r .address <<<"$BODY")" = lb.e2e.example ] || fail "E connect answered address $(jq -r .address <<<"$BODY"), not the cluster's"
[ "$(jq -c '[.gateways[].id]' <<<"$BODY")" = "[$GW_ID,$GW2_ID]" ] || fail "E connect did not name both gateways: $BODY"
has_banner "$NS_A" "$GW_PUB" "$E_PORT" || fail "E: no SSH banner through the first gateway $GW_PUB:$E_PORT"
has_banner "$NS_A" "$GW2_PUB" "$E_PORT" || fail "E: no SSH banner through the second gateway $GW2_PUB:$E_PORT"
http "$NS_BR" DELETE "$BROKER_URL/v1/connect/$E_RULE" "" "$ADMIN_SID"
expect 204 "DELETE the E connection"
has_banner "$NS_A" "$GW_PUB" "$E_PORT" && fail "E: after disconnect $GW_PUB:$E_PORT still reaches the desktop"
has_banner "$NS_A" "$GW2_PUB" "$E_PORT" && fail "E: after disconnect $GW2_PUB:$E_PORT still reaches the desktop"
pass "cluster mode E: one connect opened port $E_PORT on both gateways (both reach sshd), at the cluster's address; disconnect closed both"
stop_role gateway2 TERM
# The first gateway goes back to carrying the desktop alone (for the heartbeat part below).
http "$NS_BR" PUT "$BROKER_URL/v1/gateways/$GW_ID" '{"load_balancer_id":null}' "$ADMIN_SID"
expect 200 "take gateway $GW_ID out of the cluster"

# ---------------------------------------------------------------- missed heartbeats
say "freezing the gateway (SIGSTOP)"
kill -STOP -- "-${PIDS[gateway]}"
eventually 60 "the broker never marked the frozen gateway offline" is_offline
http "$NS_BR" POST "$BROKER_URL/v1/connect" "{\"desktop_id\":$DESK_ID,\"protocol\":\"ssh\"}" "$ADMIN_SID"
expect 503 "connect while the desktop's only gateway is offline"
pass "missed heartbeats: gateway $GW_ID offline (online false), connect answers 503"
kill -CONT -- "-${PIDS[gateway]}"
eventually 60 "the thawed gateway never came back online" is_online
alive gateway || fail "the gateway exited"
pass "the thawed gateway is online again"

# ---------------------------------------------------------------- broker cluster on PostgreSQL (issue 14)
# PostgreSQL on a host of its own on the private network; the SQLite broker's
# data goes into it (switch-database, sessions and keys included) and two
# brokers on two hosts serve one API from it. Gateway 1 registers with broker
# 1, gateway 2 with broker 2; each broker sees both.
NS_DB=$TAG-db; NS_BR2=$TAG-br2; ALL_NS+=("$NS_DB" "$NS_BR2")
DB_IP=10.99.2.6; BROKER2_URL=https://$BR2_IP:8080
for ns in "$NS_DB" "$NS_BR2"; do
    ip netns add "$ns" || fail "ip netns add $ns"
    ip -n "$ns" link set lo up
done
plug "$NS_DB"  eth0 $DB_IP/24  br-priv q-db
plug "$NS_BR2" eth0 $BR2_IP/24 br-priv q-br2
in_ns "$NS_DB" "$ROOT/scripts/postgres-test-server" start --listen $DB_IP >"$W/postgres.env" 2>"$W/postgres.log" \
    || fail "PostgreSQL did not start in $NS_DB: $(cat "$W/postgres.log")"
PG_DIR=$(sed -n 's/^export RDG_TEST_POSTGRES_DIR=//p' "$W/postgres.env")
PG_PORT=$(sed -n 's/^export RDG_TEST_POSTGRES_PORT=//p' "$W/postgres.env")
CLEANUP_HOOKS+=("in_ns $NS_DB '$ROOT/scripts/postgres-test-server' stop '$PG_DIR'")
( umask 077; sed -n 's/^export RDG_TEST_POSTGRES_PASSWORD=//p' "$W/postgres.env" >"$W/db-password" )
DB_URL="postgres://broker@$DB_IP:$PG_PORT/postgres?sslmode=require"
eventually 10 "broker host 2 cannot reach the database host" reaches "$NS_BR2" $DB_IP

stop_role broker TERM
in_ns "$NS_BR" "$BROKER_BIN" switch-database --data-dir "$W/broker-data" --to "$DB_URL" \
    --database-password-file "$W/db-password" >"$W/switch-database.log" 2>&1 || fail "switch-database: $(cat "$W/switch-database.log")"
grep -q "^copied .*gateway 2.*user_account 2" "$W/switch-database.log" || fail "switch-database did not report 2 gateways and 2 users: $(cat "$W/switch-database.log")"
in_ns "$NS_BR" "$BROKER_BIN" switch-database --data-dir "$W/broker-data" --to "$DB_URL" \
    --database-password-file "$W/db-password" >"$W/switch-again.log" 2>&1 && fail "a second switch-database into the same database succeeded"
grep -q "is not empty" "$W/switch-again.log" || fail "a second switch-database did not say the database is not empty: $(cat "$W/switch-again.log")"
pass "switch-database copied the SQLite broker into PostgreSQL on $DB_IP; a second copy is refused"

# The cluster's brokers present the certificate gateway 1 pinned (it names both hosts).
CLUSTER_ARGS=(--database "$DB_URL" --database-password-file "$W/db-password" --data-dir "$W/cluster-data"
              --tls-cert "$BROKER_CA" --tls-key "$W/broker-data/broker-tls.key"
              --bcrypt-cost 4 --heartbeat-interval 1 --offline-after 3)
start cbroker1 "$NS_BR"  "$BROKER_BIN" --listen $BR_IP:8080  "${CLUSTER_ARGS[@]}"
start cbroker2 "$NS_BR2" "$BROKER_BIN" --listen $BR2_IP:8080 "${CLUSTER_ARGS[@]}"
broker2_up() { in_ns "$NS_BR2" curl -s -o /dev/null -m 2 --cacert "$BROKER_CA" "$BROKER2_URL/v1/system/health"; }
eventually 60 "broker 1 on PostgreSQL did not start listening" broker_up
eventually 60 "broker 2 on PostgreSQL did not start listening" broker2_up
# The admin's session from the SQLite days is valid on both (sessions were copied, the store is shared).
http "$NS_BR2" GET "$BROKER2_URL/v1/gateways/$GW_ID" "" "$ADMIN_SID"
expect 200 "broker 2 answers the admin session created on the SQLite broker"
pass "two brokers serve one API from PostgreSQL; a session made before the switch works on both"

online_at() {   # NS URL ID: the gateway is online as that broker answers
    http "$1" GET "$2/v1/gateways/$3" "" "$ADMIN_SID"
    [ "$STATUS" = 200 ] && [ "$(jq -r '(.stored_data // .) | .online' <<<"$BODY")" = true ]
}
in_ns "$NS_GW2" "$GATEWAY_BIN" --state-dir "$W/gateway2-state" --broker https://$BR2_IP:8080 --gateway-id "$GW2_ID" \
    --control-key-file "$W/control-key-2" --broker-ca "$BROKER_CA" --port-range 21000-21999 >"$W/gateway2-reconfigure.log" 2>&1 \
    || fail "second gateway --broker https://$BR2_IP:8080: $(cat "$W/gateway2-reconfigure.log")"
start gateway2 "$NS_GW2" "$GATEWAY_BIN" serve --config "$W/gateway2.conf" --state-dir "$W/gateway2-state"
eventually 60 "gateway 1 did not register again with broker 1" online_at "$NS_BR" "$BROKER_URL" "$GW_ID"
eventually 60 "gateway 2 did not register with broker 2" online_at "$NS_BR2" "$BROKER2_URL" "$GW2_ID"
online_at "$NS_BR2" "$BROKER2_URL" "$GW_ID" || fail "broker 2 does not see gateway 1 (registered with broker 1) online"
online_at "$NS_BR" "$BROKER_URL" "$GW2_ID" || fail "broker 1 does not see gateway 2 (registered with broker 2) online"
pass "gateway 1 registered with broker 1, gateway 2 with broker 2; each broker sees both online"

# Connect calls on both brokers at once for one desktop (its gateway is gateway 1): no two get one port.
( umask 077; printf 'Authorization: Bearer %s\n' "$ADMIN_SID" >"$W/cluster-auth.header" )
callers=()
for i in $(seq 1 12); do
    if [ $((i % 2)) = 0 ]; then ns=$NS_BR2; url=$BROKER2_URL; else ns=$NS_BR; url=$BROKER_URL; fi
    in_ns "$ns" curl -s -m 30 --cacert "$BROKER_CA" -H "@$W/cluster-auth.header" -H 'Content-Type: application/json' \
        --data-binary "{\"desktop_id\":$DESK_ID,\"protocol\":\"ssh\"}" "$url/v1/connect" >"$W/connect-$i.json" &
    callers+=($!)
done
wait "${callers[@]}"
ports=(); rules=()
for i in $(seq 1 12); do
    port=$(jq -er .port "$W/connect-$i.json") && rule=$(jq -er .rule_id "$W/connect-$i.json") \
        || fail "concurrent connect $i did not succeed: $(cat "$W/connect-$i.json")"
    ports+=("$port"); rules+=("$rule")
done
[ "$(printf '%s\n' "${ports[@]}" | sort -u | wc -l)" = 12 ] || fail "12 concurrent connects on two brokers share ports: ${ports[*]}"
for port in "${ports[@]}"; do
    has_banner "$NS_A" "$GW_PUB" "$port" || fail "a rule made by the cluster ($GW_PUB:$port) does not reach the desktop's sshd"
done
for i in "${!rules[@]}"; do
    if [ $((i % 2)) = 0 ]; then ns=$NS_BR2; url=$BROKER2_URL; else ns=$NS_BR; url=$BROKER_URL; fi
    http "$ns" DELETE "$url/v1/connect/${rules[$i]}" "" "$ADMIN_SID"
    expect 204 "disconnect ${rules[$i]} through the other broker"
done
rm -f "$W/cluster-auth.header"
pass "12 connect calls on both brokers at once: 12 distinct ports (${ports[*]}), each reaches sshd; disconnects through the other broker"

# Offline marking runs once for the cluster: the frozen gateway 2 is marked (and logged) by one broker.
kill -STOP -- "-${PIDS[gateway2]}"
is_offline_at() { ! online_at "$@"; }
eventually 60 "broker 1 never saw the frozen gateway 2 offline" is_offline_at "$NS_BR" "$BROKER_URL" "$GW2_ID"
eventually 60 "broker 2 never saw the frozen gateway 2 offline" is_offline_at "$NS_BR2" "$BROKER2_URL" "$GW2_ID"
marks=$(cat "$W/cbroker1.log" "$W/cbroker2.log" | grep -c "gateway $GW2_ID is offline")
[ "$marks" = 1 ] || fail "gateway $GW2_ID was marked offline $marks times across the two brokers (once expected)"
kill -CONT -- "-${PIDS[gateway2]}"
eventually 60 "the thawed gateway 2 never came back online" online_at "$NS_BR" "$BROKER_URL" "$GW2_ID"
pass "offline marking ran once for the cluster (one log line across both brokers); thawed, gateway 2 is back"

stop_role gateway2 TERM
stop_role gateway TERM
stop_role cbroker1 TERM
stop_role cbroker2 TERM
