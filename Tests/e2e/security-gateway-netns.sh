#!/usr/bin/env bash
# End-to-end test of the PCoIP Security Gateway (issue 5) across network
# namespaces that this script creates and always deletes.
#
#   client 10.97.0.10, stranger 10.97.0.11,             public 10.97.0.0/16
#   5,001 session addresses 10.97.128.0+ (routed) ─┬─ 10.97.0.1 [sg1] 10.96.0.1 ─┬─ cm      10.96.0.5
#                                                  └─ 10.97.0.2 [sg2] 10.96.0.2 ─┤  agent   10.96.0.10  s_server + UDP echo :4172
#                                                        private 10.96.0.0/16    └─ agents  10.96.0.11  TCP + UDP echo :4172 for
#                                                                                           5,001 agent addresses 10.96.128.0+ (routed)
#
# The two networks are bridges in an eighth namespace (the switch). The real
# pcoip-security-gateway runs on sg1 and sg2, both in one gateway group (the
# grants' audience), each relaying 4172 on its public side and serving its
# control endpoint on its private side. This script plays the Connection
# Manager: it signs grants with `pcoip-security-gateway grant` and prepares
# them from the cm host. Agents: openssl s_server (throwaway certificate,
# -rev: answers each line reversed) with a UDP echo that tells the sender's
# port; and an asyncio echo holding 5,001 agent addresses for the many-session part.
#
# Checks:
#  1. a prepared session through sg1: openssl s_client -servername completes
#     its TLS handshake with the agent and a line comes back reversed; a
#     datagram from the client reaches the agent's UDP 4172 from source port
#     55000 and the answer comes back; UDP from an address without a session
#     is dropped and counted (udp_dropped.not_allowed in /v1/status).
#  2. 5,000 concurrent sessions on sg1 (MaxConnections default 5000), each
#     from its own client address with its own grant and SNI (a real TLS
#     ClientHello, echoed back by the agent), each with its own UDP binding
#     (a datagram from every address comes back via source port 55000); the
#     5,001st is closed at once and counted as `limit`; every session still
#     carries bytes; after they close, sessions and bindings return to 0.
#  3. failover: the grant is prepared on both gateways; the client works via
#     sg1; sg1 is killed (SIGKILL); the client reconnects to sg2 with the
#     same grant (TLS handshake + data, and UDP through sg2); a grant for
#     another group is refused by sg2 (401 at prepare, no_grant at connect).
#
# Client addresses: one per session (each client IP gets one UDP binding),
# as 5,000 users behind their own addresses would be; each session also has
# its own agent (a second client of one agent needs a collaboration port).
#
# Usage: Tests/e2e/security-gateway-netns.sh [BIN_DIR]
#   BIN_DIR holds pcoip-security-gateway (default: `swift build --show-bin-path`).
# Needs root, iproute2 (ip), curl, jq, openssl, python3 and an open-files
# limit of at least 20000 (the gateway holds 10,000 descriptors for 5,000
# sessions); a missing one fails the test, naming it.
# Exit 0 when every check passed, 1 otherwise (logs are printed on failure).
# Waits poll with a deadline; no check depends on how long something took.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAME=security-gateway-netns
say()  { echo "[$NAME] $*" >&2; }
pass() { echo "[$NAME] ok: $*" >&2; PASSED=$((PASSED + 1)); }
PASSED=0
# SG_E2E_SESSIONS=N: a shorter run with MaxConnections = N (default: 5000, the
# SecurityGateway.conf default, which the gateways then keep).
SESSIONS=${SG_E2E_SESSIONS:-5000}

if [ $# -ge 1 ]; then
    BIN_DIR=$1
else
    BIN_DIR=$(cd "$ROOT" && swift build --show-bin-path 2>/dev/null) || BIN_DIR=$ROOT/.build/debug
fi
SG_BIN=$BIN_DIR/pcoip-security-gateway
HELPER=$ROOT/Tests/e2e/sg-netns-helper.py

# ---------------------------------------------------------------- preconditions
missing=()
[ "$(id -u)" -eq 0 ] || missing+=("root (network namespaces need CAP_NET_ADMIN; run as root)")
for tool in ip curl jq openssl python3 setsid timeout; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
PYTHON=$(command -v python3 2>/dev/null)
[ -x "$SG_BIN" ] || missing+=("$SG_BIN (build first: swift build)")
[ -f "$HELPER" ] || missing+=("$HELPER")
if ! ulimit -n 20000 2>/dev/null; then
    missing+=("an open-files limit of 20000 (ulimit -n 20000 failed; hard limit $(ulimit -Hn))")
fi
if ((${#missing[@]})); then
    for m in "${missing[@]}"; do echo "[$NAME] FAIL: missing: $m" >&2; done
    echo "[$NAME] FAIL: cannot run; scripts/install-deps test installs the packages" >&2
    exit 1
fi

# ---------------------------------------------------------------- hosts and cleanup
TAG="lsg$$"
NS_SW=$TAG-sw; NS_CL=$TAG-cl; NS_SG1=$TAG-sg1; NS_SG2=$TAG-sg2; NS_CM=$TAG-cm; NS_AG=$TAG-ag; NS_AGS=$TAG-ags
ALL_NS=("$NS_CL" "$NS_SG1" "$NS_SG2" "$NS_CM" "$NS_AG" "$NS_AGS" "$NS_SW")
CLIENT_IP=10.97.0.10; STRANGER_IP=10.97.0.11; SG1_PUB=10.97.0.1; SG2_PUB=10.97.0.2
SG1_PRIV=10.96.0.1; SG2_PRIV=10.96.0.2; CM_IP=10.96.0.5; AGENT_IP=10.96.0.10; AGENTS_IP=10.96.0.11
MANY_CLIENTS=10.97.128.0; MANY_AGENTS=10.96.128.0          # first of SESSIONS+1 addresses each
GROUP=e2e-group; PORT=4172; CONTROL_PORT=4173; SOURCE_PORT=55000
SG1_CONTROL=$SG1_PRIV:$CONTROL_PORT; SG2_CONTROL=$SG2_PRIV:$CONTROL_PORT

# W, PIDS, FAILED; stop_role, show_logs, cleanup (the traps), fail, in_ns,
# start, alive, eventually, make_namespaces, plug.
source "$(dirname "${BASH_SOURCE[0]}")/netns-lib.sh"

# ---------------------------------------------------------------- topology
make_namespaces
plug "$NS_CL"  eth0  $CLIENT_IP/16 br-pub  p-cl
ip -n "$NS_CL" addr add $STRANGER_IP/16 dev eth0
plug "$NS_SG1" pub0  $SG1_PUB/16   br-pub  p-sg1
plug "$NS_SG1" priv0 $SG1_PRIV/16  br-priv q-sg1
plug "$NS_SG2" pub0  $SG2_PUB/16   br-pub  p-sg2
plug "$NS_SG2" priv0 $SG2_PRIV/16  br-priv q-sg2
plug "$NS_CM"  eth0  $CM_IP/16     br-priv q-cm
plug "$NS_AG"  eth0  $AGENT_IP/16  br-priv q-ag
plug "$NS_AGS" eth0  $AGENTS_IP/16 br-priv q-ags
# The many session addresses live on the hosts' loopback and are routed to
# them, so the gateways keep two neighbours, not 10,000.
python3 - "$MANY_CLIENTS" "$MANY_AGENTS" $((SESSIONS + 1)) "$W" <<'EOF' || fail "cannot write the address lists"
import ipaddress, sys
clients, agents, count, work = ipaddress.IPv4Address(sys.argv[1]), ipaddress.IPv4Address(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
for name, first in (("clients", clients), ("agents", agents)):
    with open(f"{work}/{name}.batch", "w") as f:
        for i in range(count):
            f.write(f"address add {first + i}/32 dev lo\n")
EOF
ip -n "$NS_CL" -batch "$W/clients.batch" || fail "cannot add $((SESSIONS + 1)) client addresses"
ip -n "$NS_AGS" -batch "$W/agents.batch" || fail "cannot add $((SESSIONS + 1)) agent addresses"
for ns in "$NS_SG1" "$NS_SG2"; do
    ip -n "$ns" route add 10.97.128.0/17 via $CLIENT_IP || fail "route to the client addresses in $ns"
    ip -n "$ns" route add 10.96.128.0/17 via $AGENTS_IP || fail "route to the agent addresses in $ns"
done
reaches() { in_ns "$1" "$PYTHON" "$HELPER" reach "$2" 2>/dev/null; }   # NS ADDRESS
eventually 10 "the client cannot reach sg1" reaches "$NS_CL" $SG1_PUB
eventually 10 "the client cannot reach sg2" reaches "$NS_CL" $SG2_PUB
eventually 10 "the cm cannot reach sg1's private side" reaches "$NS_CM" $SG1_PRIV
eventually 10 "sg1 cannot reach the agent" reaches "$NS_SG1" $AGENT_IP
eventually 10 "sg2 cannot reach the agent" reaches "$NS_SG2" $AGENT_IP
eventually 10 "sg1 cannot reach the many agents' addresses" reaches "$NS_SG1" $MANY_AGENTS
reaches "$NS_CL" $AGENT_IP && fail "the client reaches the agent directly (the networks are not separate)"
pass "topology: client -> sg1, sg2 public; sg1, sg2 private -> cm, agents; the client cannot reach the agent"

# ---------------------------------------------------------------- keys, agents
cd "$W" || fail "cd $W"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out cm.key 2>/dev/null || fail "openssl: CM key"
openssl req -x509 -new -key cm.key -days 2 -subj /CN=e2e-cm -out cm.crt 2>/dev/null || fail "openssl: CM certificate"
openssl req -x509 -newkey rsa:2048 -nodes -keyout agent.key -days 2 -subj /CN=agent.e2e.test -out agent.crt 2>/dev/null \
    || fail "openssl: agent certificate"
chmod 600 cm.key agent.key
start agent-tls "$NS_AG" openssl s_server -accept $AGENT_IP:$PORT -cert agent.crt -key agent.key -rev
start agent-udp "$NS_AG" "$PYTHON" "$HELPER" agent --udp $AGENT_IP:$PORT
start agents "$NS_AGS" "$PYTHON" "$HELPER" agent --tcp 0.0.0.0:$PORT --udp 0.0.0.0:$PORT   # open files: 20000, set above
listening() { in_ns "$NS_SG1" timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }
eventually 20 "s_server did not listen on $AGENT_IP:$PORT" listening $AGENT_IP $PORT
eventually 20 "the many-agents echo did not listen on $MANY_AGENTS:$PORT" listening $MANY_AGENTS $PORT
pass "agents: openssl s_server and UDP echo on $AGENT_IP:$PORT; echo for $((SESSIONS + 1)) agent addresses from $MANY_AGENTS"

# ---------------------------------------------------------------- gateways
# The control endpoints speak TLS (issue 14) with one certificate for both
# gateways' control addresses; the CM side trusts only it (SGCONTROL_CA).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=sg-control \
    -addext "subjectAltName=IP:$SG1_PRIV,IP:$SG2_PRIV" -addext "basicConstraints=critical,CA:TRUE" \
    -keyout "$W/sg-control.key" -out "$W/sg-control.crt" >/dev/null 2>&1 || fail "openssl could not make the control certificate"
export SGCONTROL_CA=$W/sg-control.crt
write_config() {   # NAME PUBLIC PRIVATE
    cat >"$W/$1.conf" <<EOF
# $1: both gateways are in one group.
GatewayGroup = $GROUP
JwtVerifyingCert = $W/cm.crt
ListenAddress = $2:$PORT
ControlListen = $3:$CONTROL_PORT
ControlTLSCert = $W/sg-control.crt
ControlTLSKey = $W/sg-control.key
AgentSourcePort = $SOURCE_PORT
EOF
    # MaxConnections stays at its default (5000) unless a shorter run asks for less.
    [ "$SESSIONS" = 5000 ] || echo "MaxConnections = $SESSIONS" >>"$W/$1.conf"
}
write_config sg1 $SG1_PUB $SG1_PRIV
write_config sg2 $SG2_PUB $SG2_PRIV
for sg in sg1 sg2; do
    "$SG_BIN" --check --config "$W/$sg.conf" >"$W/$sg-check.log" 2>&1 || fail "$sg --check: $(cat "$W/$sg-check.log")"
done
start sg1 "$NS_SG1" "$SG_BIN" serve --config "$W/sg1.conf" --data-dir "$W/sg1-data" --log-level notice
start sg2 "$NS_SG2" "$SG_BIN" serve --config "$W/sg2.conf" --data-dir "$W/sg2-data" --log-level notice

# http URL [METHOD] [BODY]: from the cm host; sets STATUS and BODY.
http() {
    local url=$1 method=${2:-GET} body=${3:-}
    local args=(-s -m 15 -X "$method" -o "$W/http.body" -w '%{http_code}' --cacert "$SGCONTROL_CA")
    [ -n "$body" ] && args+=(-H 'Content-Type: application/json' --data-binary "@$body")
    STATUS=$(in_ns "$NS_CM" curl "${args[@]}" "$url") || STATUS=${STATUS:-000}
    BODY=$(cat "$W/http.body" 2>/dev/null || true)
    rm -f "$W/http.body"
}
healthy() { http "https://$1/health"; [ "$STATUS" = 200 ] && [ "$BODY" = '{"code":200,"status":"success"}' ]; }
eventually 60 "sg1 did not answer GET /health with 200 on $SG1_CONTROL" healthy $SG1_CONTROL
eventually 60 "sg2 did not answer GET /health with 200 on $SG2_CONTROL" healthy $SG2_CONTROL
status_of() { http "https://$1/v1/status"; [ "$STATUS" = 200 ] || fail "GET /v1/status on $1: HTTP $STATUS"; printf '%s' "$BODY"; }
figure() { status_of "$1" | jq -er "$2"; }   # CONTROL JQ-PATH
pass "sg1 and sg2 serving (group $GROUP), healthy"

# grant FILE ARGS...: signs grants as the CM would (one JWT per line in FILE, mode 0600).
grant() {
    local file=$1; shift
    ( umask 077; "$SG_BIN" grant --jwt-signing-key "$W/cm.key" "$@" >"$W/$file" ) || fail "pcoip-security-gateway grant $*"
}
# prepare_on CONTROL FILE [EXPECTED]: the CM prepares each grant of FILE on one gateway.
prepare_on() {
    in_ns "$NS_CM" "$PYTHON" "$HELPER" prepare --control "$1" --grants "$W/$2" --expect "${3:-201}" >"$W/prepare.out" 2>>"$W/prepare.log" \
        || fail "preparing $2 on $1: $(cat "$W/prepare.out") $(tail -3 "$W/prepare.log")"
}

# ---------------------------------------------------------------- 1. one session, TCP and UDP
grant session.jwt --audience $GROUP --agent $AGENT_IP:$PORT --sni agent.e2e.test --session-id e2e-1 --lifetime 600
prepare_on $SG1_CONTROL session.jwt
prepare_on $SG2_CONTROL session.jwt     # the CM prepares on every gateway of the failover list
[ "$(figure $SG1_CONTROL .prepared_grants)" = 1 ] || fail "sg1 does not count the prepared grant"

# tls_session NAME SG: openssl s_client through SG with the grant's SNI, as a coprocess.
tls_session() {
    coproc TLS { exec ip netns exec "$NS_CL" openssl s_client -connect "$2:$PORT" -servername agent.e2e.test -quiet 2>>"$W/$1.log"; }
}
# end_tls [kill]: waits (up to 15 s) for the s_client coprocess to end, killing it when asked or late.
end_tls() {
    local pid=${TLS_PID:-}
    [ -n "$pid" ] || return 0
    [ "${1:-}" = kill ] && kill "$pid" 2>/dev/null
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
# line TEXT: sends a line on the TLS session and expects it back reversed (s_server -rev).
line() {
    local reply expected
    expected=$(rev <<<"$1")
    printf '%s\n' "$1" >&"${TLS[1]}" || return 1
    IFS= read -r -t 15 reply <&"${TLS[0]}" || return 1
    [ "$reply" = "$expected" ]
}
tls_session s_client-1 $SG1_PUB
line "through-sg1-$$" || fail "s_client through sg1: no TLS session with the agent (no reversed line; $(tail -3 "$W/s_client-1.log"))"
[ "$(figure $SG1_CONTROL .active_sessions)" = 1 ] || fail "sg1 does not count the live session"
pass "TCP: s_client -servername agent.e2e.test completed its TLS handshake with the agent through sg1, data both ways"

udp_ping() { in_ns "$NS_CL" "$PYTHON" "$HELPER" udp-ping "$@" 2>>"$W/udp.log"; }
udp_ping --bind $CLIENT_IP:50000 --to $SG1_PUB:$PORT --payload first --expect-port $SOURCE_PORT \
    || fail "UDP from the client through sg1 did not come back from the agent via source port $SOURCE_PORT: $(tail -2 "$W/udp.log")"
pass "UDP: the client's datagram reached the agent's $PORT from source port $SOURCE_PORT through sg1 and the answer came back"

before=$(figure $SG1_CONTROL '.udp_dropped.not_allowed // 0')
udp_ping --bind $STRANGER_IP:50001 --to $SG1_PUB:$PORT --payload intruder --expect-none \
    || fail "UDP from $STRANGER_IP (no session) was answered"
dropped_more() { [ "$(figure $SG1_CONTROL '.udp_dropped.not_allowed // 0')" -gt "$before" ]; }
eventually 10 "sg1 did not count the stranger's datagrams as udp_dropped.not_allowed" dropped_more
pass "UDP from $STRANGER_IP without a session: dropped, counted (udp_dropped.not_allowed $before -> $(figure $SG1_CONTROL .udp_dropped.not_allowed))"
end_tls kill
sessions_back_to_zero() { [ "$(figure "$1" .active_sessions)" = 0 ] && [ "$(figure "$1" .udp_bindings)" = 0 ]; }
eventually 20 "sg1 still counts the closed session" sessions_back_to_zero $SG1_CONTROL

# ---------------------------------------------------------------- 2. 5,000 sessions, the 5,001st refused
say "signing and preparing $((SESSIONS + 1)) grants (one SNI and one agent each)"
grant many.jwt --audience $GROUP --agent $MANY_AGENTS:$PORT --sequential-agents --sni "s{n}.agents.e2e.test" \
    --session-id "many-{n}" --lifetime 600 --count $((SESSIONS + 1))
prepare_on $SG1_CONTROL many.jwt
say "$(cat "$W/prepare.out")"
[ "$(figure $SG1_CONTROL .prepared_grants)" = $((SESSIONS + 2)) ] || fail "sg1 holds $(figure $SG1_CONTROL .prepared_grants) prepared grants, not $((SESSIONS + 2))"
limit_before=$(figure $SG1_CONTROL '.refusals.limit // 0')
rm -f "$W/ready" "$W/release"
start sessions "$NS_CL" "$PYTHON" "$HELPER" sessions \
    --sg $SG1_PUB:$PORT --first-client $MANY_CLIENTS --count "$SESSIONS" --sni "s{n}.agents.e2e.test" \
    --expect-port $SOURCE_PORT --expect-refused --ready-file "$W/ready" --release-file "$W/release"
ready() { [ -s "$W/ready" ] || { alive sessions || fail "the session client exited early: $(tail -5 "$W/sessions.log")"; return 1; }; }
eventually 120 "the $SESSIONS sessions were not all up" ready
summary=$(cat "$W/ready")
say "held: $summary"
[ "$(jq -r .established <<<"$summary")" = "$SESSIONS" ] || fail "only $(jq -r .established <<<"$summary") of $SESSIONS sessions established: $(grep -m3 'session ' "$W/sessions.log")"
[ "$(figure $SG1_CONTROL .active_sessions)" = "$SESSIONS" ] || fail "sg1 counts $(figure $SG1_CONTROL .active_sessions) active sessions, not $SESSIONS"
[ "$(jq -r .udp_ok <<<"$summary")" = "$SESSIONS" ] || fail "UDP came back for $(jq -r .udp_ok <<<"$summary") of $SESSIONS client addresses"
[ "$(figure $SG1_CONTROL .udp_bindings)" = "$SESSIONS" ] || fail "sg1 has $(figure $SG1_CONTROL .udp_bindings) UDP bindings, not $SESSIONS"
pass "$SESSIONS concurrent sessions admitted through sg1 (own address, grant and SNI each; ClientHello echoed by the agent), $SESSIONS UDP bindings carrying datagrams via source port $SOURCE_PORT"
[ "$(jq -r .refused <<<"$summary")" = true ] || fail "session $((SESSIONS + 1)) was not refused"
limit_now=$(figure $SG1_CONTROL '.refusals.limit // 0')
[ "$limit_now" -gt "$limit_before" ] || fail "the refusal of session $((SESSIONS + 1)) was not counted as limit ($limit_before -> $limit_now)"
pass "session $((SESSIONS + 1)) closed at once without a byte, counted as refusals.limit ($limit_before -> $limit_now)"
touch "$W/release"
finished() { ! alive sessions; }
eventually 60 "the session client did not finish" finished
wait "${PIDS[sessions]}"; rc=$?
unset "PIDS[sessions]"
[ "$rc" = 0 ] || fail "the session client reports a failure: $(tail -3 "$W/sessions.log")"
eventually 60 "sg1 did not return to 0 sessions and 0 UDP bindings" sessions_back_to_zero $SG1_CONTROL
healthy $SG1_CONTROL || fail "sg1 is not healthy after the many-session run: $BODY"
pass "every session still carried bytes at the end; closed, sg1 is back to 0 sessions and 0 UDP bindings, healthy"

# ---------------------------------------------------------------- 3. failover
tls_session s_client-2 $SG1_PUB
line "before-failover" || fail "the failover client got no TLS session through sg1 ($(tail -3 "$W/s_client-2.log"))"
udp_ping --bind $CLIENT_IP:50002 --to $SG1_PUB:$PORT --payload via-sg1 --expect-port $SOURCE_PORT \
    || fail "UDP through sg1 before the failover: $(tail -2 "$W/udp.log")"
pass "failover client: TLS session and UDP through sg1"
say "killing sg1 (SIGKILL)"
stop_role sg1 KILL
healthy $SG1_CONTROL && fail "sg1 still answers after SIGKILL"
# The client sees its session end and reconnects to the next gateway with the same grant.
end_tls
tls_session s_client-3 $SG2_PUB
line "after-failover" || fail "the client could not continue through sg2 with the same grant ($(tail -3 "$W/s_client-3.log"))"
udp_ping --bind $CLIENT_IP:50002 --to $SG2_PUB:$PORT --payload via-sg2 --expect-port $SOURCE_PORT \
    || fail "UDP through sg2 after the failover: $(tail -2 "$W/udp.log")"
[ "$(figure $SG2_CONTROL .active_sessions)" = 1 ] || fail "sg2 does not count the moved session"
pass "failover: sg1 killed, the client continued through sg2 with the same grant (TLS handshake, data, UDP via source port $SOURCE_PORT)"
end_tls kill

grant other.jwt --audience other-group --agent $AGENT_IP:$PORT --sni other.e2e.test --session-id e2e-other
jq -cn --rawfile g "$W/other.jwt" '{grant: ($g | rtrimstr("\n"))}' >"$W/other.body" || fail "jq: the prepare body"
http "https://$SG2_CONTROL/v1/sessions" POST "$W/other.body"
[ "$STATUS" = 401 ] && grep -q other-group <<<"$BODY" || fail "sg2 answered HTTP $STATUS to a grant for another group: $BODY"
no_grant_before=$(figure $SG2_CONTROL '.refusals.no_grant // 0')
in_ns "$NS_CL" timeout 15 openssl s_client -connect $SG2_PUB:$PORT -servername other.e2e.test </dev/null >"$W/other.out" 2>&1
grep -q "BEGIN CERTIFICATE\|Server certificate" "$W/other.out" && fail "a client with the other group's SNI reached the agent through sg2"
eventually 10 "sg2 did not count the other group's client as no_grant" \
    test "$(figure $SG2_CONTROL '.refusals.no_grant // 0')" -gt "$no_grant_before"
pass "a grant for another group: refused by sg2 at prepare (401 naming other-group) and at connect (no_grant)"

stop_role sg2 TERM
