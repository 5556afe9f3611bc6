#!/usr/bin/env bash
# End-to-end test of the kernel forwarding path (issue 12) across network
# namespaces that this script creates and always deletes.
#
#   client A 10.97.1.10 ─┐                               ┌─ desktop 10.97.2.3
#   client B 10.97.1.11 ─┤ public 10.97.1.0/24           │  TCP echo :7007
#                        └─ 10.97.1.1 [gateway] 10.97.2.1 ┘  UDP echo :7008
#
# The real leostream-gateway serves with kernel_path on; this script signs
# the pushes as the broker would (Tests/e2e/kernel-path-helper.py, the key
# made here) and reads the table with nft. Checked:
#   - refusals before anything changes: no CAP_NET_ADMIN (names the
#     capability), net.ipv4.ip_forward = 0 (names the sysctl), a config
#     without a specific public_address (names the key);
#   - use_src_ip 0, 1 and 2 for TCP and UDP: the client reaches the desktop
#     through nftables DNAT (no listener on the port), the other client is
#     refused where the method says so;
#   - counters per rule in GET /control/v1/rules, --status and SIGUSR1;
#   - expiry by the kernel of an unused rule, a used rule losing its expiry;
#   - revocation: the rule's element and its flows' conntrack entries go, a
#     live connection through it stops;
#   - SIGKILL of the gateway with live TCP and UDP flows that keep working,
#     and a restart that reconciles the table (elements and counters kept);
#   - a batch that fails (an element somebody else put in our table) changes
#     nothing; another table in the namespace is never touched;
#   - offload: the client's first connection in the userspace relay, the
#     next ones through the kernel;
#   - `leostream-gateway uninstall` removes the table, and only it.
#
# Usage: Tests/e2e/kernel-path-netns.sh [BIN_DIR]   (default .build/debug)
# Needs root, ip, nft (nftables), conntrack, python3, socat, ss; a missing
# one fails the test, naming it. Waits poll with a deadline.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN_DIR=${1:-${LEOSTREAM_BIN_DIR:-$ROOT/.build/debug}}
GATEWAY_BIN=$BIN_DIR/leostream-gateway
HELPER=$ROOT/Tests/e2e/kernel-path-helper.py
NAME=kernel-path-netns

say()  { echo "[$NAME] $*" >&2; }
pass() { echo "[$NAME] ok: $*" >&2; PASSED=$((PASSED + 1)); }
PASSED=0

missing=()
[ "$(id -u)" -eq 0 ] || missing+=("root (network namespaces and nftables need CAP_NET_ADMIN)")
for tool in ip nft conntrack python3 socat ss setsid setpriv timeout; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -x "$GATEWAY_BIN" ] || missing+=("$GATEWAY_BIN (build first: swift build)")
if ((${#missing[@]})); then
    for m in "${missing[@]}"; do echo "[$NAME] FAIL: missing: $m" >&2; done
    echo "[$NAME] FAIL: cannot run; scripts/install-deps test installs the packages" >&2
    exit 1
fi

TAG="lkp$$"
NS_SW=$TAG-sw; NS_A=$TAG-a; NS_B=$TAG-b; NS_GW=$TAG-gw; NS_DK=$TAG-dk
ALL_NS=("$NS_A" "$NS_B" "$NS_GW" "$NS_DK" "$NS_SW")
A_IP=10.97.1.10; B_IP=10.97.1.11; GW_PUB=10.97.1.1; GW_PRIV=10.97.2.1; DK_IP=10.97.2.3
TCP_PORT=7007; UDP_PORT=7008
TABLE=lkp_gateway
CONTROL=$GW_PRIV:19010
source "$(dirname "${BASH_SOURCE[0]}")/netns-lib.sh"

make_namespaces
plug "$NS_A"  eth0 $A_IP/24     br-pub  p-a
plug "$NS_B"  eth0 $B_IP/24     br-pub  p-b
plug "$NS_GW" pub0 $GW_PUB/24   br-pub  p-gw
plug "$NS_GW" priv0 $GW_PRIV/24 br-priv q-gw
plug "$NS_DK" eth0 $DK_IP/24    br-priv q-dk
reaches() { in_ns "$1" ping -c1 -W1 "$2" >/dev/null 2>&1; }
eventually 10 "client A cannot reach the gateway" reaches "$NS_A" $GW_PUB
eventually 10 "the gateway cannot reach the desktop" reaches "$NS_GW" $DK_IP
reaches "$NS_A" $DK_IP && fail "client A reaches the desktop directly"
pass "topology: A, B -> gateway public; gateway private -> desktop; A cannot reach the desktop"

start tcp-echo "$NS_DK" socat "TCP-LISTEN:$TCP_PORT,bind=$DK_IP,reuseaddr,fork" EXEC:cat
start udp-echo "$NS_DK" python3 "$HELPER" udp-server $DK_IP $UDP_PORT
tcp_echo() { in_ns "$1" python3 "$HELPER" tcp-echo "$2" "$3" 2>>"$W/echo.log"; }   # NS HOST PORT
udp_echo() { in_ns "$1" python3 "$HELPER" udp-echo "$2" "$3" 2>>"$W/echo.log"; }
eventually 20 "the desktop's TCP echo did not answer" tcp_echo "$NS_GW" $DK_IP $TCP_PORT
eventually 20 "the desktop's UDP echo did not answer" udp_echo "$NS_GW" $DK_IP $UDP_PORT
pass "desktop: TCP echo :$TCP_PORT and UDP echo :$UDP_PORT answer"

# Somebody else's table in the gateway's namespace: it must never change.
in_ns "$NS_GW" nft -f - <<'EOF' || fail "cannot add the other table"
table ip other_admin {
    chain input { type filter hook input priority 10; policy accept; }
    set blocked { type ipv4_addr; elements = { 192.0.2.99 } }
}
EOF
OTHER_BEFORE=$(in_ns "$NS_GW" nft list table ip other_admin)

# ---------------------------------------------------------------- gateway config and key
GW_STATE=$W/gateway-state
export LEOCONTROL_CA=$GW_STATE/control-tls.crt   # the control endpoint's own certificate (TLS, issue 14)
cat >"$W/gateway.conf" <<EOF
loops = 1
drain_timeout = 1s
control_listen = $CONTROL
public_address = $GW_PUB
desktop_networks = 10.97.2.0/24
kernel_path = on
kernel_table = $TABLE
forwarding = kernel
EOF
( umask 077; python3 -c 'import base64,os; print(base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode())' >"$W/control-key" )
# The broker is never reached (nobody listens there): registration retries in the background.
in_ns "$NS_GW" "$GATEWAY_BIN" --state-dir "$GW_STATE" --broker 10.97.2.250:8080 --gateway-id 7 \
    --control-key-file "$W/control-key" --port-range 21000-21099 >"$W/configure.log" 2>&1 \
    || fail "gateway --broker ...: $(cat "$W/configure.log")"
in_ns "$NS_GW" "$GATEWAY_BIN" --check --config "$W/gateway.conf" >"$W/check.log" 2>&1 || fail "--check: $(cat "$W/check.log")"

# ---------------------------------------------------------------- refusals
# refused_with WHAT TEXT CMD...: CMD exits non-zero within 60 s and says TEXT; the table is not made.
refused_with() {
    local what=$1 text=$2; shift 2
    timeout 60 "$@" >"$W/refusal.log" 2>&1 && fail "$what: the gateway started"
    grep -qF -- "$text" "$W/refusal.log" || fail "$what: the refusal does not say \"$text\": $(cat "$W/refusal.log")"
    in_ns "$NS_GW" nft list table inet $TABLE >/dev/null 2>&1 && fail "$what: the table was made anyway"
    return 0
}
in_ns "$NS_GW" sysctl -qw net.ipv4.ip_forward=0
refused_with "ip_forward off" "net.ipv4.ip_forward is 0" \
    ip netns exec "$NS_GW" "$GATEWAY_BIN" serve --config "$W/gateway.conf" --state-dir "$GW_STATE"
pass "with net.ipv4.ip_forward = 0 the gateway refuses, naming the sysctl"
in_ns "$NS_GW" sysctl -qw net.ipv4.ip_forward=1
refused_with "no CAP_NET_ADMIN" "CAP_NET_ADMIN" \
    ip netns exec "$NS_GW" setpriv --bounding-set=-net_admin --inh-caps=-net_admin \
    "$GATEWAY_BIN" serve --config "$W/gateway.conf" --state-dir "$GW_STATE"
pass "without CAP_NET_ADMIN the gateway refuses, naming the capability"
sed 's/^public_address = .*/public_address = 0.0.0.0/' "$W/gateway.conf" >"$W/wildcard.conf"
"$GATEWAY_BIN" --check --config "$W/wildcard.conf" >"$W/refusal.log" 2>&1 && fail "a wildcard public_address passed --check"
grep -q "wildcard.conf:[0-9]*: public_address:" "$W/refusal.log" || fail "the wildcard refusal does not name the line and key: $(cat "$W/refusal.log")"
pass "kernel_path with public_address 0.0.0.0 is refused at --check, naming the file, line and key"

# ---------------------------------------------------------------- start
start gateway "$NS_GW" "$GATEWAY_BIN" serve --config "$W/gateway.conf" --state-dir "$GW_STATE"
control_up() { in_ns "$NS_GW" python3 "$HELPER" call $CONTROL 7 "$W/control-key" GET /control/v1/rules >/dev/null 2>&1; }
eventually 60 "the gateway's control endpoint did not answer" control_up
in_ns "$NS_GW" nft list table inet $TABLE >/dev/null || fail "the gateway did not make table inet $TABLE"
pass "gateway serving; table inet $TABLE made"

# ctl METHOD PATH [JSON]: sets STATUS and BODY.
ctl() {
    local out
    out=$(in_ns "$NS_GW" python3 "$HELPER" call $CONTROL 7 "$W/control-key" "$@") || fail "control call $*: helper failed"
    STATUS=${out%% *}; BODY=${out#* }
}
push() {   # ID JSON -> PORT
    ctl PUT "/control/v1/rules/$1" "$2"
    [[ "$STATUS" == 20[01] ]] || fail "push $1 $2: HTTP $STATUS: $BODY"
    python3 -c 'import json,sys; print(json.loads(sys.argv[1])["port"])' "$BODY"
}
listening() { in_ns "$NS_GW" ss -Hlntu "sport = :$1" | grep -q .; }   # PORT
# element_for MAP TEXT: the map's listing (in $W/map.txt) holds TEXT. A listing
# nft cannot make (5 tries) fails the test: an absence is never assumed.
element_for() {
    local i
    for i in 1 2 3 4 5; do
        if in_ns "$NS_GW" nft list map inet $TABLE "$1" >"$W/map.txt" 2>>"$W/nft.log"; then grep -q -- "$2" "$W/map.txt"; return; fi
        sleep 0.2
    done
    fail "nft cannot list map $1 of table inet $TABLE: $(tail -3 "$W/nft.log")"
}
listing() { tr '\n' ' ' <"$W/map.txt" | tr -s ' ' | cut -c1-600; }
rule_json() {  # ID: the rule's JSON from GET /control/v1/rules
    ctl GET /control/v1/rules
    python3 -c 'import json,sys; r=[x for x in json.loads(sys.argv[1]) if x["id"]==sys.argv[2]]; print(json.dumps(r[0]) if r else "")' "$BODY" "$1"
}
field() { python3 -c 'import json,sys; v=json.loads(sys.argv[1]); [v:=v.get(k) if isinstance(v,dict) else None for k in sys.argv[2].split(".")]; print(v if v is not None else "")' "$1" "$2"; }

# ---------------------------------------------------------------- methods
P0=$(push m0-tcp "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"$DK_IP:$TCP_PORT\"}") || exit 1
listening "$P0" && fail "method 0: the gateway listens on $P0 (the rule should be in the kernel only)"
element_for dnat_open "$GW_PUB . tcp . $P0" || fail "method 0: no element for $P0 in dnat_open: $(listing)"
eventually 20 "method 0 TCP: A cannot echo through $GW_PUB:$P0" tcp_echo "$NS_A" $GW_PUB "$P0"
eventually 20 "method 0 TCP: B cannot echo through $GW_PUB:$P0" tcp_echo "$NS_B" $GW_PUB "$P0"
pass "use_src_ip 0, TCP: A and B reach the desktop through DNAT on $P0 (no listener on the gateway)"

P0U=$(push m0-udp "{\"protocol\":\"udp\",\"method\":0,\"target\":\"$DK_IP:$UDP_PORT\"}") || exit 1
eventually 20 "method 0 UDP: A gets no echo through $P0U" udp_echo "$NS_A" $GW_PUB "$P0U"
eventually 20 "method 0 UDP: B gets no echo through $P0U" udp_echo "$NS_B" $GW_PUB "$P0U"
pass "use_src_ip 0, UDP: A and B get echoes through $P0U"

P1=$(push m1-both "{\"protocol\":\"tcp+udp\",\"method\":1,\"client_ip\":\"$A_IP\",\"port\":$TCP_PORT,\"target\":\"$DK_IP:$TCP_PORT\"}") || exit 1
[ "$P1" = "$TCP_PORT" ] || fail "method 1: port $P1, not the protocol's own $TCP_PORT"
element_for dnat_client "$A_IP . $GW_PUB . tcp . $TCP_PORT" || fail "method 1: no client element for A: $(listing)"
element_for dnat_client "$A_IP . $GW_PUB . udp . $TCP_PORT" || fail "method 1: no UDP client element for A: $(listing)"
eventually 20 "method 1: A cannot echo through $TCP_PORT" tcp_echo "$NS_A" $GW_PUB $TCP_PORT
tcp_echo "$NS_B" $GW_PUB $TCP_PORT && fail "method 1: B echoes through A's rule on $TCP_PORT"
P1U=$(push m1-udp "{\"protocol\":\"udp\",\"method\":1,\"client_ip\":\"$A_IP\",\"port\":$UDP_PORT,\"target\":\"$DK_IP:$UDP_PORT\"}") || exit 1
eventually 20 "method 1 UDP: A gets no echo through $UDP_PORT" udp_echo "$NS_A" $GW_PUB $UDP_PORT
udp_echo "$NS_B" $GW_PUB $UDP_PORT && fail "method 1 UDP: B gets echoes through A's rule on $UDP_PORT"
pass "use_src_ip 1, TCP+UDP on the protocol's port $TCP_PORT and UDP on $P1U: A through, B refused"

P2=$(push m2-udp "{\"protocol\":\"udp\",\"method\":2,\"client_ip\":\"$A_IP\",\"target\":\"$DK_IP:$UDP_PORT\"}") || exit 1
P2T=$(push m2-tcp "{\"protocol\":\"tcp\",\"method\":2,\"client_ip\":\"$A_IP\",\"target\":\"$DK_IP:$TCP_PORT\"}") || exit 1
eventually 20 "method 2 UDP: A gets no echo through $P2" udp_echo "$NS_A" $GW_PUB "$P2"
udp_echo "$NS_B" $GW_PUB "$P2" && fail "method 2 UDP: B gets echoes through A's rule"
eventually 20 "method 2 TCP: A cannot echo through $P2T" tcp_echo "$NS_A" $GW_PUB "$P2T"
tcp_echo "$NS_B" $GW_PUB "$P2T" && fail "method 2 TCP: B echoes through A's rule"
pass "use_src_ip 2, UDP and TCP on random ports $P2, $P2T: A through, B refused"

# ---------------------------------------------------------------- counters
counted() {  # ID: flows and bytes both above zero
    local json; json=$(rule_json "$1")
    [ -n "$json" ] && [ "$(field "$json" kernel.flows)" -gt 0 ] 2>/dev/null && [ "$(field "$json" kernel.bytes)" -gt 0 ] 2>/dev/null
}
eventually 20 "m0-tcp shows no kernel counters in GET /control/v1/rules" counted m0-tcp
eventually 20 "m2-udp shows no kernel counters" counted m2-udp
status_shows() { "$GATEWAY_BIN" --status --state-dir "$GW_STATE" 2>&1 | grep -E "^ +m0-tcp .* kernel .* [1-9][0-9]*/[1-9][0-9]*/[1-9][0-9]*" >/dev/null; }
eventually 20 "--status shows no kernel counters for m0-tcp: $("$GATEWAY_BIN" --status --state-dir "$GW_STATE" 2>&1 | tail -8)" status_shows
kill -USR1 "${PIDS[gateway]}"
usr1_logged() { grep -q "kernel path: [0-9]* forward(s), [1-9][0-9]* flow(s)" "$W/gateway.log"; }
eventually 20 "SIGUSR1 did not log the kernel path's counters" usr1_logged
pass "counters per rule: GET /control/v1/rules, --status and SIGUSR1 show flows, packets and bytes"

# ---------------------------------------------------------------- expiry
PX=$(push expiring "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"$DK_IP:$TCP_PORT\",\"unused_expiry_s\":2}") || exit 1
in_ns "$NS_GW" nft list map inet $TABLE dnat_open | grep -- "$GW_PUB . tcp . $PX" | grep -q "expires" \
    || fail "the unused rule's element has no kernel expiry"
gone() { ! element_for dnat_open "$GW_PUB . tcp . $PX" && [ -z "$(rule_json expiring)" ]; }
eventually 30 "the kernel did not expire the unused rule on $PX (or the gateway kept it)" gone
PU=$(push used "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"$DK_IP:$TCP_PORT\",\"unused_expiry_s\":3}") || exit 1
eventually 10 "cannot use the rule on $PU" tcp_echo "$NS_A" $GW_PUB "$PU"
permanent() { in_ns "$NS_GW" nft list map inet $TABLE dnat_open | grep -- "$GW_PUB . tcp . $PU" | grep -vq "expires"; }
eventually 20 "the used rule's element kept its expiry" permanent
sleep_until() { [ "$(date +%s)" -ge "$1" ]; }
eventually 30 "clock" sleep_until $(( $(date +%s) + 5 ))
[ -n "$(rule_json used)" ] || fail "the used rule expired"
tcp_echo "$NS_A" $GW_PUB "$PU" || fail "the used rule stopped forwarding after its expiry time"
pass "expiry: the kernel removed an unused rule at 2 s; a used rule lost its expiry and stays"

# ---------------------------------------------------------------- revocation
start hold-revoke "$NS_A" python3 "$HELPER" hold $GW_PUB "$P0" "$W/hold-revoke"
progress() { local n; n=$(cat "$W/$1" 2>/dev/null); [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge "$2" ]; }   # FILE MIN
eventually 20 "the long-lived connection through $P0 made no progress" progress hold-revoke 5
ctl DELETE /control/v1/rules/m0-tcp
[ "$STATUS" = 204 ] || fail "DELETE m0-tcp: HTTP $STATUS: $BODY"
element_for dnat_open "$GW_PUB . tcp . $P0" && fail "the revoked rule's element is still in the table"
broken() { grep -q "^broken" "$W/$1" 2>/dev/null; }
eventually 20 "the live connection through the revoked rule still carries data ($(cat "$W/hold-revoke"))" broken hold-revoke
in_ns "$NS_GW" conntrack -L -p tcp --orig-dst $GW_PUB --orig-port-dst "$P0" 2>/dev/null | grep -q ESTABLISHED \
    && fail "conntrack still holds an established flow of the revoked rule"
tcp_echo "$NS_A" $GW_PUB "$P0" && fail "a new connection went through the revoked rule"
pass "revocation: element removed, the live connection's conntrack entry deleted (it stopped), new ones refused"

# ---------------------------------------------------------------- SIGKILL and restart with live flows
start hold-tcp "$NS_A" python3 "$HELPER" hold $GW_PUB "$P2T" "$W/hold-tcp"
start hold-udp "$NS_A" python3 "$HELPER" hold $GW_PUB "$P2" "$W/hold-udp" udp
eventually 20 "the live TCP flow made no progress" progress hold-tcp 5
eventually 20 "the live UDP flow made no progress" progress hold-udp 5
COUNTERS_BEFORE=$(field "$(rule_json m2-udp)" kernel.packets)
stop_role gateway KILL
t=$(cat "$W/hold-tcp"); u=$(cat "$W/hold-udp")
eventually 20 "the TCP flow stopped while the gateway was dead ($(cat "$W/hold-tcp"))" progress hold-tcp $((t + 10))
eventually 20 "the UDP flow stopped while the gateway was dead ($(cat "$W/hold-udp"))" progress hold-udp $((u + 10))
start gateway "$NS_GW" "$GATEWAY_BIN" serve --config "$W/gateway.conf" --state-dir "$GW_STATE"
eventually 60 "the restarted gateway's control endpoint did not answer" control_up
t=$(cat "$W/hold-tcp"); u=$(cat "$W/hold-udp")
eventually 20 "the TCP flow stopped after the restart ($(cat "$W/hold-tcp"))" progress hold-tcp $((t + 10))
eventually 20 "the UDP flow stopped after the restart ($(cat "$W/hold-udp"))" progress hold-udp $((u + 10))
kept_counting() { local n; n=$(field "$(rule_json m2-udp)" kernel.packets); [ -n "$n" ] && [ "$n" -gt "${COUNTERS_BEFORE:-0}" ]; }
eventually 20 "the restarted gateway lost m2-udp's counters" kept_counting
for rule in m0-udp m1-both m2-udp m2-tcp used; do [ -n "$(rule_json $rule)" ] || fail "rule $rule was not restored"; done
pass "SIGKILL with live TCP and UDP flows: they went on while it was dead and after the restart; rules and counters kept"

# ---------------------------------------------------------------- a failed batch changes nothing
# The stray element takes a port no rule holds: on a rule's own port, `nft
# add` of its element is a no-op and the delete below would take the rule's
# element away (the rules' ports are random in the range).
ctl GET /control/v1/rules
STRAY=$(python3 -c 'import json,sys; held={r["port"] for r in json.loads(sys.argv[1])}; print(next(p for p in range(21099, 20999, -1) if p not in held))' "$BODY") \
    || fail "no free port in the range for the stray element"
in_ns "$NS_GW" nft add element inet $TABLE dnat_open "{ $GW_PUB . tcp . $STRAY : $DK_IP . $TCP_PORT }" \
    || fail "cannot add the stray element"
TABLE_BEFORE=$(in_ns "$NS_GW" nft -s list table inet $TABLE | grep -v expires)
ctl GET /control/v1/rules; RULES_BEFORE=$(python3 -c 'import json,sys; print(sorted(r["id"] for r in json.loads(sys.argv[1])))' "$BODY")
ctl PUT /control/v1/rules/clash "{\"protocol\":\"tcp\",\"method\":0,\"port\":$STRAY,\"target\":\"$DK_IP:$TCP_PORT\"}"
[ "$STATUS" = 409 ] || fail "a push clashing with an element already in the table: HTTP $STATUS (expected 409): $BODY"
[ "$(in_ns "$NS_GW" nft -s list table inet $TABLE | grep -v expires)" = "$TABLE_BEFORE" ] || fail "the failed batch changed the table"
ctl GET /control/v1/rules; RULES_AFTER=$(python3 -c 'import json,sys; print(sorted(r["id"] for r in json.loads(sys.argv[1])))' "$BODY")
[ "$RULES_AFTER" = "$RULES_BEFORE" ] || fail "the failed push changed the rules: $RULES_AFTER"
in_ns "$NS_GW" nft delete element inet $TABLE dnat_open "{ $GW_PUB . tcp . $STRAY }"
pass "a batch the kernel refuses (element exists) answers 409 and changes neither the table nor the rules"

# ---------------------------------------------------------------- offload
PO=$(push offload "{\"protocol\":\"tcp\",\"method\":0,\"target\":\"$DK_IP:$TCP_PORT\",\"forwarding_path\":\"offload\"}") || exit 1
listening "$PO" || fail "offload: no userspace listener on $PO"
start hold-first "$NS_A" python3 "$HELPER" hold $GW_PUB "$PO" "$W/hold-first"
eventually 20 "offload: A's first connection made no progress" progress hold-first 3
relayed() { in_ns "$NS_GW" ss -Htn state established "sport = :$PO" | grep -q "$A_IP"; }
relayed || fail "offload: A's first connection is not in the userspace relay"
eventually 20 "offload: A was not offloaded to the kernel" element_for dnat_client "$A_IP . $GW_PUB . tcp . $PO"
FLOWS_BEFORE=$(field "$(rule_json offload)" kernel.flows)
tcp_echo "$NS_A" $GW_PUB "$PO" || fail "offload: A's second connection failed"
more_flows() { local n; n=$(field "$(rule_json offload)" kernel.flows); [ -n "$n" ] && [ "$n" -gt "${FLOWS_BEFORE:-0}" ]; }
eventually 20 "offload: A's second connection did not take the kernel path" more_flows
progress hold-first $(( $(cat "$W/hold-first") )) || fail "offload: A's first connection broke"
element_for dnat_client "$B_IP . $GW_PUB . tcp . $PO" && fail "offload: B offloaded without a connection"
tcp_echo "$NS_B" $GW_PUB "$PO" || fail "offload: B's first connection (userspace) failed"
pass "offload: A's first connection in the userspace relay, its next one through the kernel; B still admitted in userspace"

if grep -E "kernel table not updated|cannot read the kernel table|Fatal|error:" "$W/gateway.log" >"$W/problems.txt"; then
    fail "the gateway logged problems with the kernel table: $(head -5 "$W/problems.txt")"
fi

# ---------------------------------------------------------------- stop and uninstall
for role in hold-revoke hold-tcp hold-udp hold-first; do stop_role $role; done
stop_role gateway TERM
in_ns "$NS_GW" nft list table inet $TABLE >/dev/null 2>&1 || fail "the table went with the process (a restart would cut flows)"
in_ns "$NS_GW" "$GATEWAY_BIN" uninstall --config "$W/gateway.conf" --state-dir "$GW_STATE" >"$W/uninstall.log" 2>&1 \
    || fail "uninstall: $(cat "$W/uninstall.log")"
in_ns "$NS_GW" nft list table inet $TABLE >/dev/null 2>&1 && fail "uninstall left table inet $TABLE"
[ "$(in_ns "$NS_GW" nft list table ip other_admin)" = "$OTHER_BEFORE" ] || fail "the other table changed"
pass "uninstall removed table inet $TABLE; table ip other_admin unchanged throughout"
