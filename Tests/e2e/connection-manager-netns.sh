#!/usr/bin/env bash
# End-to-end test of the PCoIP Connection Manager and pcoip-cmsg-setup
# (issue 11) across network namespaces that this script creates and always
# deletes.
#
#   client 10.95.0.10 ─ public 10.95.0.0/16 ─┬─ 10.95.0.1 [cm: Connection Manager + sg1] 10.94.0.1 ─┬─ broker 10.94.0.5 (HTTPS :8443)
#                                            └─ 10.95.0.2 [sg2: Security Gateway]       10.94.0.2 ─┤
#                                                                       private 10.94.0.0/16       └─ agent  10.94.0.10 :4172
#                                                                                                     (openssl s_server -rev, UDP echo)
#
# The bridges live in a sixth namespace (the switch). Everything real: the
# broker core (leostream-broker, HTTPS with its own certificate, users,
# desktops, entitlements in SQLite), pcoip-cmsg-setup install on the cm host
# (both roles, a self-signed RSA 3072 certificate, a generated grant key)
# and on sg2 (Security Gateway only, verifying with the cm host's
# certificate), the daemons started with the commands install printed
# (systemd is not PID 1 here), and a PCoIP-like client
# (Tests/e2e/pcoip-test-client.py: the broker XML over HTTPS, then TLS with
# SNI and UDP to the gateway it is given).
#
# Checks:
#  1. setup: install refuses what it must (no --accept-policies without a
#     terminal, an SSO flag, a DSA certificate), each naming the flag or file
#     and writing nothing; then installs both hosts and starts the daemons.
#  2. a session: hello, authenticate, list, allocate through the CM; the
#     target is sg1 with the agent's sni, session-id and connect-tag kept;
#     TLS with the agent through sg1 and UDP via source port 55000.
#  3. health: GET /health 200; sg1 frozen: new allocations go to sg2; the
#     broker frozen: 500 "Cannot communicate with broker".
#  4. failover: a session through sg1, sg1 killed, the client continues
#     through sg2 with the same grant (TLS and UDP).
#  5. bad input: malformed XML, a DTD, an unknown user, a wrong password, a
#     desktop the user is not entitled to, and a broker session that ended
#     each get the protocol's failure answer.
#  6. configure lowers the limits on the running CM (SIGHUP, a live session
#     keeps carrying bytes); 200 clients at once get immediate failure
#     answers beyond them, none hangs; configure restores them.
#  7. status names the services, health, broker, gateways and sessions;
#     uninstall stops the daemons and removes what install wrote.
#
# Usage: Tests/e2e/connection-manager-netns.sh [BIN_DIR]
# Needs root, iproute2, curl, jq, openssl, python3. Exit 0 when every check
# passed, 1 otherwise (logs are printed on failure). Waits poll with a
# deadline; no check depends on how long something took.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
NAME=connection-manager-netns
say()  { echo "[$NAME] $*" >&2; }
pass() { echo "[$NAME] ok: $*" >&2; PASSED=$((PASSED + 1)); }
PASSED=0

if [ $# -ge 1 ]; then
    BIN_DIR=$1
else
    BIN_DIR=$(cd "$ROOT" && swift build --show-bin-path 2>/dev/null) || BIN_DIR=$ROOT/.build/debug
fi
SETUP=$BIN_DIR/pcoip-cmsg-setup
BROKER_BIN=$BIN_DIR/leostream-broker
CLIENT=$ROOT/Tests/e2e/pcoip-test-client.py
HELPER=$ROOT/Tests/e2e/sg-netns-helper.py

missing=()
[ "$(id -u)" -eq 0 ] || missing+=("root (network namespaces need CAP_NET_ADMIN; run as root)")
for tool in ip curl jq openssl python3 setsid timeout; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
for bin in "$SETUP" "$BROKER_BIN" "$BIN_DIR/pcoip-connection-manager" "$BIN_DIR/pcoip-security-gateway"; do
    [ -x "$bin" ] || missing+=("$bin (build first: swift build)")
done
if ((${#missing[@]})); then
    for m in "${missing[@]}"; do echo "[$NAME] FAIL: missing: $m" >&2; done
    echo "[$NAME] FAIL: cannot run; scripts/install-deps test installs the packages" >&2
    exit 1
fi
PYTHON=$(command -v python3)

TAG="lcm$$"
NS_SW=$TAG-sw; NS_CL=$TAG-cl; NS_CM=$TAG-cm; NS_SG2=$TAG-sg2; NS_BR=$TAG-br; NS_AG=$TAG-ag
ALL_NS=("$NS_CL" "$NS_CM" "$NS_SG2" "$NS_BR" "$NS_AG" "$NS_SW")
CLIENT_IP=10.95.0.10; CM_PUB=10.95.0.1; SG2_PUB=10.95.0.2; CM_PRIV=10.94.0.1; SG2_PRIV=10.94.0.2
BR_IP=10.94.0.5; AGENT_IP=10.94.0.10
PORT=4172; CM_PORT=443; BROKER_PORT=8443
CM_HOST_DIR=; SG2_HOST_DIR=   # set once W exists

source "$(dirname "${BASH_SOURCE[0]}")/netns-lib.sh"
CM_HOST_DIR=$W/cm-host; SG2_HOST_DIR=$W/sg2-host

# ---------------------------------------------------------------- topology
make_namespaces
plug "$NS_CL"  eth0  $CLIENT_IP/16 br-pub  p-cl
plug "$NS_CM"  pub0  $CM_PUB/16    br-pub  p-cm
plug "$NS_CM"  priv0 $CM_PRIV/16   br-priv q-cm
plug "$NS_SG2" pub0  $SG2_PUB/16   br-pub  p-sg2
plug "$NS_SG2" priv0 $SG2_PRIV/16  br-priv q-sg2
plug "$NS_BR"  eth0  $BR_IP/16     br-priv q-br
plug "$NS_AG"  eth0  $AGENT_IP/16  br-priv q-ag
reaches() { in_ns "$1" "$PYTHON" "$HELPER" reach "$2" 2>/dev/null; }
eventually 10 "the client cannot reach the cm host" reaches "$NS_CL" $CM_PUB
eventually 10 "the client cannot reach sg2" reaches "$NS_CL" $SG2_PUB
eventually 10 "the cm host cannot reach the broker" reaches "$NS_CM" $BR_IP
eventually 10 "sg2 cannot reach the agent" reaches "$NS_SG2" $AGENT_IP
reaches "$NS_CL" $AGENT_IP && fail "the client reaches the agent directly (the networks are not separate)"
reaches "$NS_CL" $BR_IP && fail "the client reaches the broker directly"
pass "topology: client -> cm host, sg2 (public); cm host, sg2 -> broker, agent (private); the client reaches neither"

# ---------------------------------------------------------------- agent and broker
cd "$W" || fail "cd $W"
openssl req -x509 -newkey rsa:2048 -nodes -keyout agent.key -days 2 -subj /CN=agent.e2e.test -out agent.crt 2>/dev/null || fail "openssl: agent"
openssl req -x509 -newkey rsa:2048 -nodes -keyout broker.key -days 2 -subj /CN=broker.e2e.test \
    -addext "subjectAltName=IP:$BR_IP" -out broker.crt 2>/dev/null || fail "openssl: broker certificate"
chmod 600 agent.key broker.key
start agent-tls "$NS_AG" openssl s_server -accept $AGENT_IP:$PORT -cert agent.crt -key agent.key -rev
start agent-udp "$NS_AG" "$PYTHON" "$HELPER" agent --udp $AGENT_IP:$PORT
ADMIN_PASSWORD=$(openssl rand -hex 16); ALICE_PASSWORD=alice-$(openssl rand -hex 8); BOB_PASSWORD=bob-$(openssl rand -hex 8)
( umask 077; printf '%s\n' "$ADMIN_PASSWORD" >"$W/admin-password" )
start broker "$NS_BR" "$BROKER_BIN" --data-dir "$W/broker-data" --listen $BR_IP:$BROKER_PORT --admin-password-file "$W/admin-password" \
    --bcrypt-cost 4 --tls-cert "$W/broker.crt" --tls-key "$W/broker.key"
BROKER=https://$BR_IP:$BROKER_PORT
broker_up() { in_ns "$NS_BR" curl -s -o /dev/null -m 2 --cacert "$W/broker.crt" "$BROKER/v1/session/login"; }
eventually 60 "the broker did not start listening on $BROKER (HTTPS)" broker_up
api() {   # METHOD PATH [BODY]: admin call from the broker host; prints the body, fails on non-2xx
    local args=(-s -f -S -m 15 --cacert "$W/broker.crt" -X "$1" -H "Authorization: Bearer $SID")
    [ -n "${3:-}" ] && args+=(-H 'Content-Type: application/json' --data-binary "$3")
    in_ns "$NS_BR" curl "${args[@]}" "$BROKER$2"
}
SID=$(in_ns "$NS_BR" curl -s -f -m 15 --cacert "$W/broker.crt" -d "{\"user_login\":\"admin\",\"password\":\"$ADMIN_PASSWORD\"}" \
      "$BROKER/v1/session/login" | jq -er .sid) || fail "admin login"
ALICE_ID=$(api POST /v1/users "{\"login\":\"alice\",\"password\":\"$ALICE_PASSWORD\"}" | jq -er '.stored_data.id // .id') || fail "user alice"
BOB_ID=$(api POST /v1/users "{\"login\":\"bob\",\"password\":\"$BOB_PASSWORD\"}" | jq -er '.stored_data.id // .id') || fail "user bob"
DESK_ID=$(api POST /v1/desktops "{\"name\":\"desk-1\",\"address\":\"$AGENT_IP\",\"protocols\":[{\"name\":\"pcoip\",\"port\":$PORT,\"transport\":\"both\"}],\"users\":[$ALICE_ID]}" \
    | jq -er '.stored_data.id // .id') || fail "desktop desk-1"
SNI="desktop-$DESK_ID.pcoip"
pass "broker on $BROKER (HTTPS): alice entitled to desk-1 (PCoIP agent $AGENT_IP:$PORT), bob entitled to nothing"

# ---------------------------------------------------------------- 1. pcoip-cmsg-setup install
setup() { local ns=$1; shift; in_ns "$ns" "$SETUP" "$@" </dev/null; }
INSTALL_CM=(install --data-dir "$CM_HOST_DIR" --bin-dir "$BIN_DIR" --broker-url "$BROKER" --ca-cert "$W/broker.crt"
            --external-pcoip-ip $CM_PUB --external-sg-ip "$SG2_PUB@$SG2_PRIV:4173" --host-address $CM_PUB --gateway-group e2e
            --cm-listen $CM_PUB:$CM_PORT --cm-control 127.0.0.1:4174 --sg-listen $CM_PUB:$PORT --sg-control $CM_PRIV:4173)
out=$(setup "$NS_CM" "${INSTALL_CM[@]}" --self-signed=true 2>&1); rc=$?
[ $rc -eq 2 ] && [[ "$out" == *"--accept-policies"* ]] || fail "install without --accept-policies and no terminal: exit $rc, $out"
[ -e "$CM_HOST_DIR/ConnectionManager.conf" ] && fail "a refused install wrote files"
out=$(setup "$NS_CM" "${INSTALL_CM[@]}" --accept-policies --self-signed --sso-enrollment-url=https://idp.example 2>&1); rc=$?
[ $rc -eq 2 ] && [[ "$out" == *"--sso-enrollment-url"* ]] && [[ "$out" == *"not supported"* ]] || fail "an SSO flag: exit $rc, $out"
openssl dsaparam -genkey -out dsa.key 2048 2>/dev/null && openssl req -x509 -new -key dsa.key -days 2 -subj /CN=dsa -out dsa.crt 2>/dev/null \
    || fail "openssl: DSA certificate"
out=$(setup "$NS_CM" "${INSTALL_CM[@]}" --accept-policies --ssl-cert "$W/dsa.crt" --ssl-key "$W/dsa.key" 2>&1); rc=$?
[ $rc -eq 2 ] && [[ "$out" == *"dsa.crt"* ]] && [[ "$out" == *"DSA"* ]] || fail "a DSA certificate: exit $rc, $out"
[ -e "$CM_HOST_DIR" ] && [ -n "$(ls -A "$CM_HOST_DIR" 2>/dev/null)" ] && fail "refused installs left files in $CM_HOST_DIR"
pass "install refuses without --accept-policies (no terminal), an SSO flag and a DSA certificate, naming each; nothing written"

setup "$NS_CM" "${INSTALL_CM[@]}" --accept-policies=true --self-signed=true --darksite-bundle-path=/nowhere >"$W/install-cm.out" 2>&1 \
    || fail "install on the cm host: $(cat "$W/install-cm.out")"
grep -q "darksite-bundle-path.*does not apply" "$W/install-cm.out" || fail "no warning for --darksite-bundle-path: $(cat "$W/install-cm.out")"
grep -q "self-signed RSA 3072" "$W/install-cm.out" || fail "install did not say it made the certificate"
openssl x509 -in "$CM_HOST_DIR/certs/connection-manager.crt" -noout -text 2>/dev/null | grep -q "Public-Key: (3072 bit)" \
    || fail "the self-signed certificate is not RSA 3072"
for f in ConnectionManager.conf SecurityGateway.conf certs/grant-signing.key certs/grant-verifying.crt; do
    [ -s "$CM_HOST_DIR/$f" ] || fail "install did not write $f"
done
[ "$(stat -c %a "$CM_HOST_DIR/certs/connection-manager.key")" = 600 ] || fail "the TLS key is not mode 0600"
setup "$NS_SG2" install --data-dir "$SG2_HOST_DIR" --bin-dir "$BIN_DIR" --accept-policies --enable-connection-manager=false \
    --external-pcoip-ip $SG2_PUB --jwt-verifying-cert "$CM_HOST_DIR/certs/grant-verifying.crt" --gateway-group e2e \
    --sg-listen $SG2_PUB:$PORT --sg-control $SG2_PRIV:4173 \
    --ssl-cert "$CM_HOST_DIR/certs/connection-manager.crt" --ssl-key "$CM_HOST_DIR/certs/connection-manager.key" \
    >"$W/install-sg2.out" 2>&1 || fail "install on sg2: $(cat "$W/install-sg2.out")"
# The deployment's certificate is every control endpoint's (issue 14): the CM trusts only it.
SG_CA=$CM_HOST_DIR/certs/connection-manager.crt
grep -q "^ControlTLSCert = " "$SG2_HOST_DIR/SecurityGateway.conf" || fail "the SG-only install did not give its control endpoint the certificate"
[ -e "$SG2_HOST_DIR/ConnectionManager.conf" ] && fail "an SG-only install wrote ConnectionManager.conf"
# No systemd here: install printed how to start the daemons; run exactly that.
start_sg() {   # ROLE NS OUTFILE
    local command
    command=$(grep -E "^  .*/pcoip-security-gateway serve " "$3" | head -1)
    [ -n "$command" ] || fail "install did not print how to start pcoip-security-gateway"
    # shellcheck disable=SC2086
    start "$1" "$2" $command
}
start_cm() {
    local command
    command=$(grep -E "^  .*/pcoip-connection-manager serve " "$W/install-cm.out" | head -1)
    [ -n "$command" ] || fail "install did not print how to start pcoip-connection-manager"
    # shellcheck disable=SC2086
    start cm "$NS_CM" $command
}
start_sg sg1 "$NS_CM" "$W/install-cm.out"
start_sg sg2 "$NS_SG2" "$W/install-sg2.out"
start_cm
healthy_at() {   # NS URL [CURL ARGS...]
    local ns=$1 url=$2; shift 2
    [ "$(in_ns "$ns" curl -s -m 5 "$@" "$url")" = '{"code":200,"status":"success"}' ]
}
# sg_get NS URL: a Security Gateway's control endpoint as the CM reaches it:
# TLS trusting only $SG_CA, no name check (the CM addresses it by the IP its config lists).
sg_get() {
    in_ns "$1" /usr/bin/python3 -c '
import ssl, sys, urllib.request
context = ssl.create_default_context(cafile=sys.argv[1])
context.check_hostname = False
try:
    print(urllib.request.urlopen(sys.argv[2], context=context, timeout=5).read().decode(), end="")
except Exception as error:
    print(f"error: {error}", file=sys.stderr); sys.exit(1)' "$SG_CA" "$2"
}
sg_healthy() { [ "$(sg_get "$1" "$2")" = '{"code":200,"status":"success"}' ]; }
eventually 60 "sg1 is not healthy" sg_healthy "$NS_CM" "https://$CM_PRIV:4173/health"
eventually 60 "sg2 is not healthy" sg_healthy "$NS_SG2" "https://$SG2_PRIV:4173/health"
healthy_at "$NS_CM" "http://$CM_PRIV:4173/health" && fail "sg1's control endpoint answered plain HTTP"
healthy_at "$NS_CM" "https://$CM_PRIV:4173/health" && fail "sg1's control endpoint was trusted without its certificate"
pass "the Security Gateways' control endpoints speak TLS only, with the deployment's certificate (the CM trusts only it)"
eventually 60 "the Connection Manager is not healthy (local control)" healthy_at "$NS_CM" "http://127.0.0.1:4174/health"
eventually 60 "the Connection Manager's GET /health over HTTPS is not 200" healthy_at "$NS_CL" "https://$CM_PUB:$CM_PORT/health" -k
pass "pcoip-cmsg-setup install on both hosts; the daemons started as it said; sg1, sg2 and the CM healthy"

# ---------------------------------------------------------------- 2. a session through the CM
client() { in_ns "$NS_CL" "$PYTHON" "$CLIENT" "$@" --cm $CM_PUB:$CM_PORT --cafile "$CM_HOST_DIR/certs/connection-manager.crt"; }
SESSION_ARGS=(--user alice --password "$ALICE_PASSWORD" --resource desk-1 --expect-sni "$SNI" --expect-udp-port 55000)
client session "${SESSION_ARGS[@]}" --expect-sg $CM_PUB >"$W/session1.json" 2>"$W/session1.log" \
    || fail "a session through the CM: $(cat "$W/session1.log")"
jq -e '.alternates | length == 1' "$W/session1.json" >/dev/null || fail "the allocation named no failover gateway: $(cat "$W/session1.json")"
pass "alice: hello, authenticate, list, allocate via the CM; target sg1 $CM_PUB with sni $SNI, session-id and connect-tag; TLS with the agent and UDP via 55000"

# The CM's and its Security Gateway's /metrics, parsed by prometheus_client: the allocation is counted.
metrics_check() {   # NS URL PYTHON-CONDITION-ON-families(dict name -> samples)
    { if [[ $2 == https://* ]]; then sg_get "$1" "$2"; else in_ns "$1" curl -s -m 10 "$2"; fi; } | /usr/bin/python3 -c '
import sys
from prometheus_client.parser import text_string_to_metric_families
families = {f.name: f.samples for f in text_string_to_metric_families(sys.stdin.read())}
value = lambda family, **labels: next((s.value for s in families.get(family, []) if all(s.labels.get(k) == v for k, v in labels.items())), None)
sys.exit(0 if ('"$3"') else 1)'
}
metrics_check "$NS_CM" http://127.0.0.1:4174/metrics 'value("cm_client_sessions") is not None and sum(s.value for s in families.get("cm_security_gateway_up", [])) == 2 and any(s.value > 0 for s in families.get("cm_events", []))' \
    || fail "the CM's /metrics: $(in_ns "$NS_CM" curl -s -m 10 http://127.0.0.1:4174/metrics | head -40)"
metrics_check "$NS_CM" "https://$CM_PRIV:4173/metrics" 'value("sg_grants_used", ) is not None and value("sg_grants_used") >= 1' \
    || fail "sg1's /metrics does not count the used grant: $(sg_get "$NS_CM" "https://$CM_PRIV:4173/metrics" | grep sg_ | head -20)"
pass "/metrics of the CM (client sessions, gateways up, events) and of sg1 (grant used) parse with prometheus_client"

# ---------------------------------------------------------------- 3. health: an unhealthy gateway, an unreachable broker
kill -STOP -- "-${PIDS[sg1]}"
unhealthy_sg1() {
    in_ns "$NS_CM" curl -s -m 5 http://127.0.0.1:4174/v1/status | jq -e '.security_gateways[] | select(.local) | .healthy == false' >/dev/null
}
eventually 60 "the CM did not notice that sg1 stopped answering" unhealthy_sg1
code=$(in_ns "$NS_CM" curl -s -m 5 -o "$W/h.json" -w '%{http_code}' http://127.0.0.1:4174/health)
[ "$code" = 500 ] && grep -q "Security Gateway is enabled but does not respond" "$W/h.json" || fail "CM health with sg1 frozen: $code $(cat "$W/h.json")"
client session "${SESSION_ARGS[@]}" --expect-sg $SG2_PUB >"$W/session2.json" 2>"$W/session2.log" \
    || fail "with sg1 unhealthy the session must go through sg2: $(cat "$W/session2.log")"
# Both gateways silent: a clear allocation failure, never the agent's own address.
kill -STOP -- "-${PIDS[sg2]}"
unhealthy_both() {
    in_ns "$NS_CM" curl -s -m 5 http://127.0.0.1:4174/v1/status | jq -e '[.security_gateways[] | .healthy] == [false, false]' >/dev/null
}
eventually 60 "the CM did not notice that sg2 stopped answering too" unhealthy_both
message() { client message "$@" 2>>"$W/messages.log"; }
message --login "alice:$ALICE_PASSWORD" --body "<pcoip-client version=\"2.1\"><allocate-resource><resource-id>$DESK_ID</resource-id></allocate-resource></pcoip-client>" \
    --expect ALLOC_FAILED_NO_SECURITY_GATEWAY >"$W/nogw.json" || fail "with no healthy gateway: $(cat "$W/nogw.json")"
kill -CONT -- "-${PIDS[sg2]}"
kill -CONT -- "-${PIDS[sg1]}"
eventually 60 "sg1 did not come back healthy" healthy_at "$NS_CM" "http://127.0.0.1:4174/health"
healthy_both() {
    in_ns "$NS_CM" curl -s -m 5 http://127.0.0.1:4174/v1/status | jq -e '[.security_gateways[] | .healthy] == [true, true]' >/dev/null
}
eventually 60 "sg1 and sg2 did not both come back healthy" healthy_both
kill -STOP -- "-${PIDS[broker]}"
broker_down() {
    code=$(in_ns "$NS_CM" curl -s -m 5 -o "$W/h.json" -w '%{http_code}' http://127.0.0.1:4174/health)
    [ "$code" = 500 ] && grep -q "Cannot communicate with broker" "$W/h.json"
}
eventually 60 "the CM's health did not report the broker" broker_down
kill -CONT -- "-${PIDS[broker]}"
eventually 60 "the CM did not recover when the broker came back" healthy_at "$NS_CM" "http://127.0.0.1:4174/health"
pass "health: sg1 frozen -> 500 'Security Gateway is enabled but does not respond' and new allocations go to sg2; both frozen -> ALLOC_FAILED_NO_SECURITY_GATEWAY; broker frozen -> 500 'Cannot communicate with broker'; all recover"

# ---------------------------------------------------------------- 4. failover with the same grant
rm -f "$W/release"
start failover "$NS_CL" "$PYTHON" "$CLIENT" session "${SESSION_ARGS[@]}" --expect-sg $CM_PUB --hold "$W/release" --ready "$W/held.json" \
    --failover --cm $CM_PUB:$CM_PORT --cafile "$CM_HOST_DIR/certs/connection-manager.crt"
eventually 60 "the failover client did not establish its session" test -s "$W/held.json"
stop_role sg1 KILL
touch "$W/release"
eventually 90 "the failover client did not finish" bash -c "! kill -0 ${PIDS[failover]} 2>/dev/null"
wait "${PIDS[failover]}"; rc=$?
[ $rc -eq 0 ] || fail "failover through sg2 with the same grant: $(cat "$W/failover.log")"
grep -q "ok: failover: TLS through $SG2_PUB" "$W/failover.log" || fail "failover did not go through sg2: $(cat "$W/failover.log")"
unset "PIDS[failover]"
start_sg sg1 "$NS_CM" "$W/install-cm.out"
eventually 60 "sg1 did not come back after the kill" healthy_at "$NS_CM" "http://127.0.0.1:4174/health"
eventually 60 "sg1 and sg2 did not both come back healthy after the kill" healthy_both
pass "failover: a session through sg1, sg1 SIGKILLed, the client went on through sg2 with the same grant (TLS and UDP via 55000); sg1 restarted healthy"

# ---------------------------------------------------------------- 5. bad input
message --body 'not xml at all' --expect ERROR_MALFORMED_REQUEST >/dev/null || fail "malformed XML"
message --body '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><pcoip-client version="2.1"><hello/></pcoip-client>' \
    --expect ERROR_MALFORMED_REQUEST >/dev/null || fail "a DTD"
message --body '<pcoip-client version="2.1"><authenticate method="password"><username>nobody</username><password>x1x</password></authenticate></pcoip-client>' \
    --expect AUTH_FAILED_UNKNOWN_USERNAME_OR_PASSWORD >/dev/null || fail "an unknown user"
message --body '<pcoip-client version="2.1"><authenticate method="password"><username>alice</username><password>wrong-password</password></authenticate></pcoip-client>' \
    --expect AUTH_FAILED_UNKNOWN_USERNAME_OR_PASSWORD >/dev/null || fail "a wrong password"
message --login "bob:$BOB_PASSWORD" --body "<pcoip-client version=\"2.1\"><allocate-resource><resource-id>$DESK_ID</resource-id></allocate-resource></pcoip-client>" \
    --expect ALLOC_FAILED_UNKNOWN_RESOURCE >/dev/null || fail "bob allocating alice's desktop"
# The broker session ends under the client (a new password ends the user's sessions).
NEW_PASSWORD=alice-$(openssl rand -hex 8)
client expired --user alice --password "$ALICE_PASSWORD" \
    --end-session "ip netns exec $NS_BR curl -s -f -m 15 --cacert $W/broker.crt -X PUT -H 'Authorization: Bearer $SID' -H 'Content-Type: application/json' --data-binary '{\"password\":\"$NEW_PASSWORD\"}' $BROKER/v1/users/$ALICE_ID >/dev/null" \
    >/dev/null 2>>"$W/messages.log" || fail "an ended broker session: $(tail -3 "$W/messages.log")"
ALICE_PASSWORD=$NEW_PASSWORD; SESSION_ARGS[3]=$ALICE_PASSWORD
pass "bad XML and a DTD: ERROR_MALFORMED_REQUEST; unknown user and wrong password: AUTH_FAILED_UNKNOWN_USERNAME_OR_PASSWORD; not entitled: ALLOC_FAILED_UNKNOWN_RESOURCE; an ended broker session: LIST_FAILED_NOT_AUTHENTICATED"

# ---------------------------------------------------------------- 6. configure on the running daemons; limits under load
rm -f "$W/release" "$W/held2.json"
start held "$NS_CL" "$PYTHON" "$CLIENT" session "${SESSION_ARGS[@]}" --hold "$W/release" --ready "$W/held2.json" \
    --cm $CM_PUB:$CM_PORT --cafile "$CM_HOST_DIR/certs/connection-manager.crt"
eventually 60 "the held client did not establish its session" test -s "$W/held2.json"
setup "$NS_CM" configure --data-dir "$CM_HOST_DIR" --max-session-establishments 2 --max-client-communications 4 \
    --enable-collaboration=true >"$W/configure.out" 2>&1 || fail "configure: $(cat "$W/configure.out")"
grep -q "sent SIGHUP to pcoip-connection-manager" "$W/configure.out" || fail "configure did not reload the CM: $(cat "$W/configure.out")"
lowered() { in_ns "$NS_CM" curl -s -m 5 http://127.0.0.1:4174/v1/status | jq -e '.max_session_establishments == 2 and .max_client_communications == 4' >/dev/null; }
eventually 30 "the running CM did not take the new limits" lowered
grep -q "EnableCollaboration = true" "$CM_HOST_DIR/SecurityGateway.conf" || fail "configure did not change SecurityGateway.conf"
client load --user alice --password "$ALICE_PASSWORD" --resource desk-1 --clients 200 --timeout 60 >"$W/load.json" 2>"$W/load.log" \
    || fail "load: $(cat "$W/load.log")"
busy=$(jq '[.counts | to_entries[] | select(.key | test("BUSY|TOO_MANY")) | .value] | add // 0' "$W/load.json")
ok=$(jq '.counts.ALLOC_SUCCESSFUL // 0' "$W/load.json")
hung=$(jq '.hung' "$W/load.json")
[ "$busy" -gt 0 ] && [ "$hung" = 0 ] || fail "limits under load: $(cat "$W/load.json")"
refused=$(in_ns "$NS_CM" curl -s -m 5 http://127.0.0.1:4174/v1/status | jq '.counters.refused_communications + .counters.refused_establishments')
[ "$refused" -gt 0 ] || fail "the CM counted no refusal"
setup "$NS_CM" configure --data-dir "$CM_HOST_DIR" --max-session-establishments 40 --max-client-communications 400 >>"$W/configure.out" 2>&1 \
    || fail "configure back: $(cat "$W/configure.out")"
touch "$W/release"
eventually 60 "the held client did not finish" bash -c "! kill -0 ${PIDS[held]} 2>/dev/null"
wait "${PIDS[held]}" || fail "the session held across configure was dropped: $(cat "$W/held.log")"
unset "PIDS[held]"
# Past the burst, service goes on (the agent, openssl s_server, serves one TLS session at a time: after the held one).
client session "${SESSION_ARGS[@]}" >"$W/after-load.json" 2>"$W/after-load.log" || fail "a session after the burst: $(cat "$W/after-load.log")"
pass "configure on the running daemons (SIGHUP): limits 2/4 taken live; 200 clients at once: $ok allocated, $busy refused at once, none hung ($(jq -c .counts "$W/load.json")); a live session kept carrying bytes"

# ---------------------------------------------------------------- 7. status and uninstall
setup "$NS_CM" status --data-dir "$CM_HOST_DIR" >"$W/status.out" 2>&1 || fail "status: $(cat "$W/status.out")"
for text in "connection manager: running (pid" "health:        healthy" "broker:        $BROKER" "security gateway $SG2_PUB:4172: healthy" \
            "security gateway $CM_PUB:4172 (this host): healthy" "security gateway: running (pid" "sessions:"; do
    grep -qF "$text" "$W/status.out" || fail "status lacks \"$text\": $(cat "$W/status.out")"
done
setup "$NS_CM" uninstall --data-dir "$CM_HOST_DIR" >"$W/uninstall.out" 2>&1 || fail "uninstall: $(cat "$W/uninstall.out")"
gone() { ! kill -0 "$1" 2>/dev/null; }
eventually 30 "uninstall did not stop the CM" gone "${PIDS[cm]}"
eventually 30 "uninstall did not stop sg1" gone "${PIDS[sg1]}"
[ -e "$CM_HOST_DIR/ConnectionManager.conf" ] || [ -e "$CM_HOST_DIR/certs" ] && fail "uninstall left files: $(ls -R "$CM_HOST_DIR")"
setup "$NS_SG2" uninstall --data-dir "$SG2_HOST_DIR" >>"$W/uninstall.out" 2>&1 || fail "uninstall on sg2"
eventually 30 "uninstall did not stop sg2" gone "${PIDS[sg2]}"
pass "status names the services, health, broker, gateways and sessions; uninstall stopped the daemons and removed what install wrote"
