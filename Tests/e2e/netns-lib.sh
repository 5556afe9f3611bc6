# Shared helpers of the network-namespace end-to-end tests, sourced by each
# script after it sets NAME, PASSED, ALL_NS (its namespaces, the switch
# NS_SW among them) and say(). Makes the work folder W (0700), PIDS (role ->
# process-group leader) and FAILED, and installs the EXIT/INT/TERM traps:
# every process started in our namespaces is stopped and every namespace
# deleted, pass or fail.

W=$(mktemp -d "/tmp/$NAME.XXXXXX")
chmod 700 "$W"
declare -A PIDS=()
FAILED=0
CLEANUP_HOOKS=()   # commands run at exit before the namespaces go (servers that daemonize)

stop_role() {   # role [signal]: stops the group (thawing it first), polling until it is gone
    local role=$1 sig=${2:-TERM} pid=${PIDS[$1]:-}
    [ -n "$pid" ] || return 0
    kill -CONT -- "-$pid" 2>/dev/null
    kill "-$sig" -- "-$pid" 2>/dev/null
    # The process or its group: a hot-upgraded gateway's successor lives in
    # its predecessor's group after the predecessor is gone.
    { for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done; } 2>/dev/null
    kill -KILL -- "-$pid" 2>/dev/null
    { wait "$pid"; } 2>/dev/null
    unset "PIDS[$role]"
}

show_logs() {
    local f
    for f in "$W"/*.log; do
        [ -s "$f" ] || continue
        echo "----- $(basename "$f") (last 40 lines)" >&2
        tail -n 40 "$f" >&2
    done
}

cleanup() {
    local rc=$? role ns pid
    trap - EXIT INT TERM
    [ "$FAILED" = 1 ] && show_logs
    for role in "${!PIDS[@]}"; do stop_role "$role" TERM 2>/dev/null; done
    local hook
    for hook in "${CLEANUP_HOOKS[@]}"; do eval "$hook" 2>/dev/null; done
    # Anything else still inside our namespaces was started by this script.
    for ns in "${ALL_NS[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$W"
    if [ "$FAILED" = 1 ] || [ "$rc" -ne 0 ]; then
        echo "[$NAME] FAILED ($PASSED checks passed before)" >&2
        exit 1
    fi
    echo "[$NAME] PASSED ($PASSED checks, ${SECONDS}s)" >&2
    exit 0
}
trap cleanup EXIT
trap 'say "interrupted"; FAILED=1; exit 1' INT TERM

fail() { echo "[$NAME] FAIL: $*" >&2; FAILED=1; exit 1; }

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# start ROLE NS CMD...: runs CMD in NS in its own process group, output to $W/ROLE.log.
start() {
    local role=$1 ns=$2; shift 2
    ip netns exec "$ns" setsid "$@" >>"$W/$role.log" 2>&1 </dev/null &
    PIDS[$role]=$!
}
# The process, or any process of its group (just after `start` the group
# does not exist yet: setsid has not run).
alive() { local pid=${PIDS[$1]:-}; [ -n "$pid" ] && { kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null; }; }

# eventually DEADLINE_S DESCRIPTION CMD...: polls CMD until it succeeds.
eventually() {
    local limit=$1 deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
    while :; do
        "$@" && return 0
        [ "$(date +%s)" -lt "$deadline" ] || fail "$what (gave up after $limit s of polling)"
        sleep 0.2
    done
}

# make_namespaces: creates every namespace of ALL_NS (loopback up) and, in
# NS_SW, the bridges br-pub and br-priv.
make_namespaces() {
    say "creating namespaces ${ALL_NS[*]}"
    local ns
    for ns in "${ALL_NS[@]}"; do
        ip netns add "$ns" || fail "ip netns add $ns"
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_SW" link add br-pub type bridge || fail "cannot create a bridge (kernel module bridge)"
    ip -n "$NS_SW" link add br-priv type bridge
    ip -n "$NS_SW" link set br-pub up
    ip -n "$NS_SW" link set br-priv up
}

# plug NS IFNAME ADDR/LEN BRIDGE SWITCHPORT: a veth from NS to a bridge of the switch.
plug() {
    ip -n "$NS_SW" link add "$5" type veth peer name "$2" netns "$1" || fail "veth $5 <-> $1/$2"
    ip -n "$NS_SW" link set "$5" master "$4" up
    ip -n "$1" addr add "$3" dev "$2"
    ip -n "$1" link set "$2" up
}
