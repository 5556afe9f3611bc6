// See CNetfilter.h. libnftnl builds the nf_tables messages, libmnl carries
// them; the conntrack messages are built with libmnl directly.
#include "CNetfilter.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/stat.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nf_conntrack_common.h>
#include <libmnl/libmnl.h>
#include <libnftnl/common.h>
#include <libnftnl/table.h>
#include <libnftnl/chain.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>
#include <libnftnl/expr.h>

// nft's type ids, so that `nft list` prints the key and data types.
// The original direction of a conntrack tuple (CT_DIR_ORIGINAL, which
// only the kernel's own headers define).
enum { CT_DIR_ORIGINAL = 0 };

enum { TYPE_IPV4_ADDR = 7, TYPE_INET_PROTO = 12, TYPE_INET_SERVICE = 13, TYPE_BITS = 6 };

static uint32_t next_seq(void);

struct nfk_batch {
    uint8_t *buffer;
    size_t length;
    size_t capacity;
    uint32_t first_seq;
    uint32_t seq;
    int count;
    bool ended;
};

// Room for one more message (messages here are well under 8 KiB).
static int reserve(nfk_batch *b, size_t more) {
    if (b->length + more <= b->capacity) return 0;
    size_t capacity = b->capacity ? b->capacity : 65536;
    while (b->length + more > capacity) capacity *= 2;
    uint8_t *grown = realloc(b->buffer, capacity);
    if (!grown) return -ENOMEM;
    memset(grown + b->capacity, 0, capacity - b->capacity);
    b->buffer = grown;
    b->capacity = capacity;
    return 0;
}

nfk_batch *nfk_batch_new(void) {
    nfk_batch *b = calloc(1, sizeof(*b));
    if (!b) return NULL;
    if (reserve(b, 8192) != 0) { free(b); return NULL; }
    b->seq = next_seq();
    struct nlmsghdr *nlh = nftnl_batch_begin((char *)b->buffer, b->seq++);
    b->length += NLMSG_ALIGN(nlh->nlmsg_len);
    b->first_seq = b->seq;
    return b;
}

void nfk_batch_free(nfk_batch *b) {
    if (!b) return;
    free(b->buffer);
    free(b);
}

int nfk_batch_count(const nfk_batch *b) { return b->count; }

const uint8_t *nfk_batch_bytes(nfk_batch *b, size_t *length) {
    if (!b->ended) {
        if (reserve(b, 64) != 0) { *length = 0; return NULL; }
        struct nlmsghdr *nlh = nftnl_batch_end((char *)b->buffer + b->length, b->seq++);
        b->length += NLMSG_ALIGN(nlh->nlmsg_len);
        b->ended = true;
    }
    *length = b->length;
    return b->buffer;
}

static struct nlmsghdr *begin(nfk_batch *b, uint16_t type, uint16_t flags) {
    if (b->ended || reserve(b, 8192) != 0) return NULL;
    return nftnl_nlmsg_build_hdr((char *)b->buffer + b->length, type, NFPROTO_INET, flags | NLM_F_ACK, b->seq++);
}

static void finish(nfk_batch *b, struct nlmsghdr *nlh) {
    b->length += NLMSG_ALIGN(nlh->nlmsg_len);
    b->count++;
}

// MARK: the table

int nfk_batch_delete_table(nfk_batch *b, const char *table) {
    struct nftnl_table *t = nftnl_table_alloc();
    if (!t) return -ENOMEM;
    nftnl_table_set_str(t, NFTNL_TABLE_NAME, table);
    nftnl_table_set_u32(t, NFTNL_TABLE_FAMILY, NFPROTO_INET);
    struct nlmsghdr *nlh = begin(b, NFT_MSG_DELTABLE, 0);
    if (!nlh) { nftnl_table_free(t); return -ENOMEM; }
    nftnl_table_nlmsg_build_payload(nlh, t);
    finish(b, nlh);
    nftnl_table_free(t);
    return 0;
}

static uint32_t concat_type(const int *types, int n) {
    uint32_t type = 0;
    for (int i = 0; i < n; i++) type = (type << TYPE_BITS) | (uint32_t)types[i];
    return type;
}

// A set (a map when data_len > 0), with timeouts and a counter per element when asked.
static int add_set(nfk_batch *b, const char *table, const char *name, uint32_t id, const int *key_types, int key_fields,
                   const int *data_types, int data_fields, bool timeouts_and_counters) {
    struct nftnl_set *s = nftnl_set_alloc();
    if (!s) return -ENOMEM;
    nftnl_set_set_str(s, NFTNL_SET_TABLE, table);
    nftnl_set_set_str(s, NFTNL_SET_NAME, name);
    nftnl_set_set_u32(s, NFTNL_SET_FAMILY, NFPROTO_INET);
    nftnl_set_set_u32(s, NFTNL_SET_ID, id);
    nftnl_set_set_u32(s, NFTNL_SET_KEY_TYPE, concat_type(key_types, key_fields));
    nftnl_set_set_u32(s, NFTNL_SET_KEY_LEN, (uint32_t)key_fields * 4);
    uint32_t flags = 0;
    if (data_fields > 0) {
        flags |= NFT_SET_MAP;
        nftnl_set_set_u32(s, NFTNL_SET_DATA_TYPE, concat_type(data_types, data_fields));
        nftnl_set_set_u32(s, NFTNL_SET_DATA_LEN, (uint32_t)data_fields * 4);
    }
    // A concatenated key needs no NFT_SET_CONCAT here: that flag is for
    // interval sets (pipapo), and the kernel refuses it on a hash (as nft does).
    if (timeouts_and_counters) {
        flags |= NFT_SET_TIMEOUT;
        struct nftnl_expr *counter = nftnl_expr_alloc("counter");
        if (!counter) { nftnl_set_free(s); return -ENOMEM; }
        nftnl_set_add_expr(s, counter); // the set owns it now
    }
    nftnl_set_set_u32(s, NFTNL_SET_FLAGS, flags);
    struct nlmsghdr *nlh = begin(b, NFT_MSG_NEWSET, NLM_F_CREATE);
    if (!nlh) { nftnl_set_free(s); return -ENOMEM; }
    nftnl_set_nlmsg_build_payload(nlh, s);
    finish(b, nlh);
    nftnl_set_free(s);
    return 0;
}

static int add_chain(nfk_batch *b, const char *table, const char *name, const char *type, uint32_t hook, int32_t priority) {
    struct nftnl_chain *c = nftnl_chain_alloc();
    if (!c) return -ENOMEM;
    nftnl_chain_set_str(c, NFTNL_CHAIN_TABLE, table);
    nftnl_chain_set_str(c, NFTNL_CHAIN_NAME, name);
    nftnl_chain_set_u32(c, NFTNL_CHAIN_FAMILY, NFPROTO_INET);
    nftnl_chain_set_str(c, NFTNL_CHAIN_TYPE, type);
    nftnl_chain_set_u32(c, NFTNL_CHAIN_HOOKNUM, hook);
    nftnl_chain_set_s32(c, NFTNL_CHAIN_PRIO, priority);
    nftnl_chain_set_u32(c, NFTNL_CHAIN_POLICY, NF_ACCEPT);
    struct nlmsghdr *nlh = begin(b, NFT_MSG_NEWCHAIN, NLM_F_CREATE);
    if (!nlh) { nftnl_chain_free(c); return -ENOMEM; }
    nftnl_chain_nlmsg_build_payload(nlh, c);
    finish(b, nlh);
    nftnl_chain_free(c);
    return 0;
}

// Expression helpers: each adds one expression to `r` (which owns it).
static void meta(struct nftnl_rule *r, uint32_t key, uint32_t dreg) {
    struct nftnl_expr *e = nftnl_expr_alloc("meta");
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, key);
    nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, dreg);
    nftnl_rule_add_expr(r, e);
}

static void cmp_u32(struct nftnl_rule *r, uint32_t sreg, uint32_t op, const void *data, uint32_t len) {
    struct nftnl_expr *e = nftnl_expr_alloc("cmp");
    nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_SREG, sreg);
    nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_OP, op);
    nftnl_expr_set(e, NFTNL_EXPR_CMP_DATA, data, len);
    nftnl_rule_add_expr(r, e);
}

static void payload(struct nftnl_rule *r, uint32_t base, uint32_t offset, uint32_t len, uint32_t dreg) {
    struct nftnl_expr *e = nftnl_expr_alloc("payload");
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, offset);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
    nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, dreg);
    nftnl_rule_add_expr(r, e);
}

static void ct(struct nftnl_rule *r, uint32_t key, int direction, uint32_t dreg) {
    struct nftnl_expr *e = nftnl_expr_alloc("ct");
    nftnl_expr_set_u32(e, NFTNL_EXPR_CT_KEY, key);
    if (direction >= 0) nftnl_expr_set_u8(e, NFTNL_EXPR_CT_DIR, (uint8_t)direction);
    nftnl_expr_set_u32(e, NFTNL_EXPR_CT_DREG, dreg);
    nftnl_rule_add_expr(r, e);
}

static void lookup(struct nftnl_rule *r, const char *set, uint32_t set_id, uint32_t sreg, int dreg) {
    struct nftnl_expr *e = nftnl_expr_alloc("lookup");
    nftnl_expr_set_str(e, NFTNL_EXPR_LOOKUP_SET, set);
    nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SET_ID, set_id);
    nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SREG, sreg);
    if (dreg >= 0) nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_DREG, (uint32_t)dreg);
    nftnl_rule_add_expr(r, e);
}

static void dnat(struct nftnl_rule *r) {
    struct nftnl_expr *e = nftnl_expr_alloc("nat");
    nftnl_expr_set_u32(e, NFTNL_EXPR_NAT_TYPE, NFT_NAT_DNAT);
    nftnl_expr_set_u32(e, NFTNL_EXPR_NAT_FAMILY, NFPROTO_IPV4);
    nftnl_expr_set_u32(e, NFTNL_EXPR_NAT_REG_ADDR_MIN, NFT_REG_1);
    nftnl_expr_set_u32(e, NFTNL_EXPR_NAT_REG_PROTO_MIN, NFT_REG32_01);
    nftnl_rule_add_expr(r, e);
}

// Only IPv4 packets (the inet family carries both).
static void only_ipv4(struct nftnl_rule *r) {
    uint8_t ipv4 = NFPROTO_IPV4;
    meta(r, NFT_META_NFPROTO, NFT_REG_1);
    cmp_u32(r, NFT_REG_1, NFT_CMP_EQ, &ipv4, 1);
}

// Appends rule `r` to `chain` in the batch and frees it (in every case).
static int add_rule(nfk_batch *b, struct nftnl_rule *r, const char *table, const char *chain) {
    nftnl_rule_set_str(r, NFTNL_RULE_TABLE, table);
    nftnl_rule_set_str(r, NFTNL_RULE_CHAIN, chain);
    nftnl_rule_set_u32(r, NFTNL_RULE_FAMILY, NFPROTO_INET);
    struct nlmsghdr *nlh = begin(b, NFT_MSG_NEWRULE, NLM_F_APPEND | NLM_F_CREATE);
    if (nlh) {
        nftnl_rule_nlmsg_build_payload(nlh, r);
        finish(b, nlh);
    }
    nftnl_rule_free(r);
    return nlh ? 0 : -ENOMEM;
}

enum { ID_PUBLICS = 1, ID_OPEN, ID_CLIENT, ID_TRAFFIC_OPEN, ID_TRAFFIC_CLIENT };

int nfk_batch_create_table(nfk_batch *b, const char *table) {
    int rc;
    struct nftnl_table *t = nftnl_table_alloc();
    if (!t) return -ENOMEM;
    nftnl_table_set_str(t, NFTNL_TABLE_NAME, table);
    nftnl_table_set_u32(t, NFTNL_TABLE_FAMILY, NFPROTO_INET);
    struct nlmsghdr *nlh = begin(b, NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL);
    if (!nlh) { nftnl_table_free(t); return -ENOMEM; }
    nftnl_table_nlmsg_build_payload(nlh, t);
    finish(b, nlh);
    nftnl_table_free(t);

    const int address[] = {TYPE_IPV4_ADDR};
    const int open_key[] = {TYPE_IPV4_ADDR, TYPE_INET_PROTO, TYPE_INET_SERVICE};
    const int client_key[] = {TYPE_IPV4_ADDR, TYPE_IPV4_ADDR, TYPE_INET_PROTO, TYPE_INET_SERVICE};
    const int target[] = {TYPE_IPV4_ADDR, TYPE_INET_SERVICE};
    if ((rc = add_set(b, table, NFK_SET_PUBLICS, ID_PUBLICS, address, 1, NULL, 0, false))) return rc;
    if ((rc = add_set(b, table, NFK_MAP_OPEN, ID_OPEN, open_key, 3, target, 2, true))) return rc;
    if ((rc = add_set(b, table, NFK_MAP_CLIENT, ID_CLIENT, client_key, 4, target, 2, true))) return rc;
    if ((rc = add_set(b, table, NFK_SET_TRAFFIC_OPEN, ID_TRAFFIC_OPEN, open_key, 3, NULL, 0, true))) return rc;
    if ((rc = add_set(b, table, NFK_SET_TRAFFIC_CLIENT, ID_TRAFFIC_CLIENT, client_key, 4, NULL, 0, true))) return rc;
    if ((rc = add_chain(b, table, "prerouting", "nat", NF_INET_PRE_ROUTING, -100))) return rc;
    if ((rc = add_chain(b, table, "postrouting", "nat", NF_INET_POST_ROUTING, 100))) return rc;
    if ((rc = add_chain(b, table, "forward", "filter", NF_INET_FORWARD, 0))) return rc;

    // prerouting: a client's own rule first, then the open ones.
    struct nftnl_rule *r = nftnl_rule_alloc();
    only_ipv4(r);
    payload(r, NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_1);      // ip saddr
    payload(r, NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG32_01);   // ip daddr
    meta(r, NFT_META_L4PROTO, NFT_REG32_02);
    payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_03);  // th dport
    lookup(r, NFK_MAP_CLIENT, ID_CLIENT, NFT_REG_1, NFT_REG_1);
    dnat(r);
    if ((rc = add_rule(b, r, table, "prerouting"))) return rc;

    r = nftnl_rule_alloc();
    only_ipv4(r);
    payload(r, NFT_PAYLOAD_NETWORK_HEADER, 16, 4, NFT_REG_1);      // ip daddr
    meta(r, NFT_META_L4PROTO, NFT_REG32_01);
    payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_02);  // th dport
    lookup(r, NFK_MAP_OPEN, ID_OPEN, NFT_REG_1, NFT_REG_1);
    dnat(r);
    if ((rc = add_rule(b, r, table, "prerouting"))) return rc;

    // postrouting: replies come back through the gateway.
    r = nftnl_rule_alloc();
    uint32_t dnat_bit = IPS_DST_NAT, zero = 0;
    ct(r, NFT_CT_STATUS, -1, NFT_REG_1);
    struct nftnl_expr *bitwise = nftnl_expr_alloc("bitwise");
    nftnl_expr_set_u32(bitwise, NFTNL_EXPR_BITWISE_SREG, NFT_REG_1);
    nftnl_expr_set_u32(bitwise, NFTNL_EXPR_BITWISE_DREG, NFT_REG_1);
    nftnl_expr_set_u32(bitwise, NFTNL_EXPR_BITWISE_LEN, 4);
    nftnl_expr_set(bitwise, NFTNL_EXPR_BITWISE_MASK, &dnat_bit, 4);
    nftnl_expr_set(bitwise, NFTNL_EXPR_BITWISE_XOR, &zero, 4);
    nftnl_rule_add_expr(r, bitwise);
    cmp_u32(r, NFT_REG_1, NFT_CMP_NEQ, &zero, 4);
    ct(r, NFT_CT_DST_IP, CT_DIR_ORIGINAL, NFT_REG_1);
    lookup(r, NFK_SET_PUBLICS, ID_PUBLICS, NFT_REG_1, -1);
    nftnl_rule_add_expr(r, nftnl_expr_alloc("masq"));
    if ((rc = add_rule(b, r, table, "postrouting"))) return rc;

    // forward: each element's counter counts its flows' packets, both ways.
    r = nftnl_rule_alloc();
    ct(r, NFT_CT_SRC_IP, CT_DIR_ORIGINAL, NFT_REG_1);
    ct(r, NFT_CT_DST_IP, CT_DIR_ORIGINAL, NFT_REG32_01);
    ct(r, NFT_CT_PROTOCOL, CT_DIR_ORIGINAL, NFT_REG32_02);
    ct(r, NFT_CT_PROTO_DST, CT_DIR_ORIGINAL, NFT_REG32_03);
    lookup(r, NFK_SET_TRAFFIC_CLIENT, ID_TRAFFIC_CLIENT, NFT_REG_1, -1);
    if ((rc = add_rule(b, r, table, "forward"))) return rc;

    r = nftnl_rule_alloc();
    ct(r, NFT_CT_DST_IP, CT_DIR_ORIGINAL, NFT_REG_1);
    ct(r, NFT_CT_PROTOCOL, CT_DIR_ORIGINAL, NFT_REG32_01);
    ct(r, NFT_CT_PROTO_DST, CT_DIR_ORIGINAL, NFT_REG32_02);
    lookup(r, NFK_SET_TRAFFIC_OPEN, ID_TRAFFIC_OPEN, NFT_REG_1, -1);
    return add_rule(b, r, table, "forward");
}

// MARK: elements

static int element(nfk_batch *b, uint16_t type, uint16_t flags, const char *table, const char *set, const void *key,
                   uint32_t key_len, const void *data, uint32_t data_len, uint64_t timeout_ms) {
    struct nftnl_set *s = nftnl_set_alloc();
    if (!s) return -ENOMEM;
    nftnl_set_set_str(s, NFTNL_SET_TABLE, table);
    nftnl_set_set_str(s, NFTNL_SET_NAME, set);
    nftnl_set_set_u32(s, NFTNL_SET_FAMILY, NFPROTO_INET);
    struct nftnl_set_elem *e = nftnl_set_elem_alloc();
    if (!e) { nftnl_set_free(s); return -ENOMEM; }
    nftnl_set_elem_set(e, NFTNL_SET_ELEM_KEY, key, key_len);
    if (data && data_len) nftnl_set_elem_set(e, NFTNL_SET_ELEM_DATA, data, data_len);
    if (timeout_ms) nftnl_set_elem_set_u64(e, NFTNL_SET_ELEM_TIMEOUT, timeout_ms);
    nftnl_set_elem_add(s, e); // the set owns it now
    struct nlmsghdr *nlh = begin(b, type, flags);
    if (!nlh) { nftnl_set_free(s); return -ENOMEM; }
    nftnl_set_elems_nlmsg_build_payload(nlh, s);
    finish(b, nlh);
    nftnl_set_free(s);
    return 0;
}

int nfk_batch_add_element(nfk_batch *b, const char *table, const char *set, const void *key, uint32_t key_len,
                          const void *data, uint32_t data_len, uint64_t timeout_ms) {
    // A map's element (with data: where a port goes) is added exclusively:
    // an existing one is a clash, and the batch fails. A set's element (a
    // counter, an address) is added or kept as it is: a forward put back
    // after its map element was deleted by hand finds its counter there,
    // and failing on it would fail every later batch too.
    uint16_t flags = NLM_F_CREATE | ((data && data_len) ? NLM_F_EXCL : 0);
    return element(b, NFT_MSG_NEWSETELEM, flags, table, set, key, key_len, data, data_len, timeout_ms);
}

int nfk_batch_delete_element(nfk_batch *b, const char *table, const char *set, const void *key, uint32_t key_len) {
    return element(b, NFT_MSG_DELSETELEM, 0, table, set, key, key_len, NULL, 0, 0);
}

// MARK: sockets

// One netlink socket for the process, kept open: closing a nf_tables socket
// waits for the kernel's deferred work on deleted elements (an RCU grace
// period, 10-20 ms), which made every removal cost that much. It belongs to
// the network namespace it was opened in, so it is reopened when the caller
// is in another one (tests enter namespaces of their own). The lock makes one
// request at a time use it.
static pthread_mutex_t nl_lock = PTHREAD_MUTEX_INITIALIZER;
static struct mnl_socket *nl_cached;
static dev_t nl_ns_dev;
static ino_t nl_ns_ino;
static size_t nl_send_buffer;
static uint32_t nl_sequence;

// Sequence numbers of single requests: distinct, so that an answer is never taken for another's.
static uint32_t next_seq(void) {
    if (__atomic_load_n(&nl_sequence, __ATOMIC_RELAXED) == 0) {
        uint32_t start = (uint32_t)time(NULL) << 12;
        uint32_t zero = 0;
        __atomic_compare_exchange_n(&nl_sequence, &zero, start, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    }
    return __atomic_add_fetch(&nl_sequence, 1, __ATOMIC_RELAXED);
}

static struct mnl_socket *open_socket(void) {
    struct mnl_socket *nl = mnl_socket_open(NETLINK_NETFILTER);
    if (!nl) return NULL;
    if (mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) { int saved = errno; mnl_socket_close(nl); errno = saved; return NULL; }
    int fd = mnl_socket_get_fd(nl);
    int receive = 4 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &receive, sizeof(receive)) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receive, sizeof(receive));
    // Never wait forever for the kernel's answer.
    struct timeval timeout = {.tv_sec = 10, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    return nl;
}

// Locks and returns the socket for the calling thread's namespace, with room
// to send `send_bytes` in one sendmsg and nothing left unread from before.
static struct mnl_socket *acquire(size_t send_bytes) {
    pthread_mutex_lock(&nl_lock);
    struct stat ns;
    if (stat("/proc/thread-self/ns/net", &ns) != 0) memset(&ns, 0, sizeof(ns));
    if (nl_cached && (ns.st_dev != nl_ns_dev || ns.st_ino != nl_ns_ino)) {
        mnl_socket_close(nl_cached);
        nl_cached = NULL;
    }
    if (!nl_cached) {
        nl_cached = open_socket();
        if (!nl_cached) { int saved = errno; pthread_mutex_unlock(&nl_lock); errno = saved; return NULL; }
        nl_ns_dev = ns.st_dev;
        nl_ns_ino = ns.st_ino;
        nl_send_buffer = 0;
    }
    int fd = mnl_socket_get_fd(nl_cached);
    if (send_bytes + 65536 > nl_send_buffer) {
        // FORCE works as root (CAP_NET_ADMIN); the plain option up to wmem_max.
        int size = (int)(send_bytes + 65536);
        if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) != 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        nl_send_buffer = (size_t)size;
    }
    // Answers a failed request left behind are dropped.
    static uint8_t stale[8192];
    while (recv(fd, stale, sizeof(stale), MSG_DONTWAIT) > 0) {}
    return nl_cached;
}

// Unlocks; a socket that failed to send or receive is closed (the next
// request opens another).
static void release(bool broken) {
    if (broken && nl_cached) {
        mnl_socket_close(nl_cached);
        nl_cached = NULL;
    }
    pthread_mutex_unlock(&nl_lock);
}

int nfk_send(nfk_batch *b, int *failed) {
    *failed = -1;
    size_t length;
    const uint8_t *bytes = nfk_batch_bytes(b, &length);
    if (!bytes) return -ENOMEM;
    if (b->count == 0) return 0;
    struct mnl_socket *nl = acquire(length);
    if (!nl) return -errno;
    if (mnl_socket_sendto(nl, bytes, length) < 0) { int rc = -errno; release(true); return rc; }
    uint32_t portid = mnl_socket_get_portid(nl);
    static uint8_t buffer[65536];
    int acked = 0, rc = 0;
    bool broken = false;
    while (acked < b->count && rc == 0) {
        ssize_t n = mnl_socket_recvfrom(nl, buffer, sizeof(buffer));
        if (n < 0) { rc = -errno; broken = true; break; }
        const struct nlmsghdr *nlh = (const struct nlmsghdr *)buffer;
        int left = (int)n;
        while (mnl_nlmsg_ok(nlh, left)) {
            bool ours = nlh->nlmsg_seq >= b->first_seq && nlh->nlmsg_seq < b->seq && (nlh->nlmsg_pid == 0 || nlh->nlmsg_pid == portid);
            if (ours && nlh->nlmsg_type == NLMSG_ERROR) {
                const struct nlmsgerr *err = mnl_nlmsg_get_payload(nlh);
                if (err->error != 0) {
                    rc = err->error; // negative errno: the kernel applied none of the batch
                    *failed = (int)(nlh->nlmsg_seq - b->first_seq);
                    break;
                }
                acked++;
            }
            nlh = mnl_nlmsg_next(nlh, &left);
        }
    }
    release(broken);
    return rc;
}

// MARK: reading

struct query {
    nfk_element_fn fn;
    void *context;
    int found;
};

static int counter_of(struct nftnl_expr *e, void *data) {
    uint64_t *values = data;
    const char *name = nftnl_expr_get_str(e, NFTNL_EXPR_NAME);
    if (name && strcmp(name, "counter") == 0) {
        values[0] = nftnl_expr_get_u64(e, NFTNL_EXPR_CTR_PACKETS);
        values[1] = nftnl_expr_get_u64(e, NFTNL_EXPR_CTR_BYTES);
    }
    return 0;
}

static int element_of(struct nftnl_set_elem *e, void *data) {
    struct query *q = data;
    uint32_t key_len = 0, data_len = 0;
    const uint8_t *key = nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY, &key_len);
    const uint8_t *value = nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_DATA) ? nftnl_set_elem_get(e, NFTNL_SET_ELEM_DATA, &data_len) : NULL;
    uint64_t timeout = nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_TIMEOUT) ? nftnl_set_elem_get_u64(e, NFTNL_SET_ELEM_TIMEOUT) : 0;
    uint64_t expires = nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_EXPIRATION) ? nftnl_set_elem_get_u64(e, NFTNL_SET_ELEM_EXPIRATION) : 0;
    uint64_t counter[2] = {0, 0};
    nftnl_set_elem_expr_foreach(e, counter_of, counter);
    q->fn(q->context, key, key_len, value, data_len, timeout, expires, counter[0], counter[1]);
    q->found++;
    return 0;
}

static int elements_message(const struct nlmsghdr *nlh, void *data) {
    struct nftnl_set *s = nftnl_set_alloc();
    if (!s) return MNL_CB_ERROR;
    if (nftnl_set_elems_nlmsg_parse(nlh, s) < 0) { nftnl_set_free(s); return MNL_CB_ERROR; }
    nftnl_set_elem_foreach(s, element_of, data);
    nftnl_set_free(s);
    return MNL_CB_OK;
}

// Sends one request and runs `cb` on every answer until the kernel is done
// (NLMSG_DONE of a dump, or the ACK or error of a single request).
static int request(struct nlmsghdr *nlh, mnl_cb_t cb, void *data) {
    struct mnl_socket *nl = acquire(nlh->nlmsg_len);
    if (!nl) return -errno;
    uint32_t seq = nlh->nlmsg_seq, portid = mnl_socket_get_portid(nl);
    if (mnl_socket_sendto(nl, nlh, nlh->nlmsg_len) < 0) { int rc = -errno; release(true); return rc; }
    static uint8_t buffer[1 << 16];
    int rc;
    bool broken = false;
    for (;;) {
        ssize_t n = mnl_socket_recvfrom(nl, buffer, sizeof(buffer));
        if (n < 0) { rc = -errno; broken = true; break; }
        rc = mnl_cb_run(buffer, (size_t)n, seq, portid, cb, data);
        if (rc <= MNL_CB_STOP) { rc = rc < 0 ? -errno : 0; break; }
    }
    release(broken);
    return rc;
}

int nfk_dump_elements(const char *table, const char *set, nfk_element_fn fn, void *context) {
    uint8_t buffer[4096];
    struct nftnl_set *s = nftnl_set_alloc();
    if (!s) return -ENOMEM;
    nftnl_set_set_str(s, NFTNL_SET_TABLE, table);
    nftnl_set_set_str(s, NFTNL_SET_NAME, set);
    nftnl_set_set_u32(s, NFTNL_SET_FAMILY, NFPROTO_INET);
    struct nlmsghdr *nlh = nftnl_nlmsg_build_hdr((char *)buffer, NFT_MSG_GETSETELEM, NFPROTO_INET, NLM_F_DUMP,
                                                 next_seq());
    nftnl_set_elems_nlmsg_build_payload(nlh, s);
    nftnl_set_free(s);
    struct query q = {.fn = fn, .context = context, .found = 0};
    return request(nlh, elements_message, &q);
}

static int table_message(const struct nlmsghdr *nlh, void *data) {
    (void)nlh;
    *(int *)data = 1;
    return MNL_CB_OK;
}

int nfk_table_exists(const char *table) {
    uint8_t buffer[4096];
    struct nftnl_table *t = nftnl_table_alloc();
    if (!t) return -ENOMEM;
    nftnl_table_set_str(t, NFTNL_TABLE_NAME, table);
    nftnl_table_set_u32(t, NFTNL_TABLE_FAMILY, NFPROTO_INET);
    struct nlmsghdr *nlh = nftnl_nlmsg_build_hdr((char *)buffer, NFT_MSG_GETTABLE, NFPROTO_INET, NLM_F_ACK, next_seq());
    nftnl_table_nlmsg_build_payload(nlh, t);
    nftnl_table_free(t);
    int found = 0;
    int rc = request(nlh, table_message, &found);
    if (rc == -ENOENT) return 0;
    return rc < 0 ? rc : found;
}

// MARK: conntrack

struct ct_filter {
    uint32_t src, dst;
    uint8_t protocol;
    uint16_t dport;
    // The matching entries' CTA_TUPLE_ORIG attributes, copied.
    uint8_t *tuples;
    size_t length, capacity;
};

struct tuple_fields {
    uint32_t src, dst;
    uint8_t protocol;
    uint16_t dport;
};

static int ip_attr(const struct nlattr *a, void *data) {
    struct tuple_fields *t = data;
    switch (mnl_attr_get_type(a)) {
    case CTA_IP_V4_SRC: if (mnl_attr_validate(a, MNL_TYPE_U32) == 0) t->src = mnl_attr_get_u32(a); break;
    case CTA_IP_V4_DST: if (mnl_attr_validate(a, MNL_TYPE_U32) == 0) t->dst = mnl_attr_get_u32(a); break;
    }
    return MNL_CB_OK;
}

static int proto_attr(const struct nlattr *a, void *data) {
    struct tuple_fields *t = data;
    switch (mnl_attr_get_type(a)) {
    case CTA_PROTO_NUM: if (mnl_attr_validate(a, MNL_TYPE_U8) == 0) t->protocol = mnl_attr_get_u8(a); break;
    case CTA_PROTO_DST_PORT: if (mnl_attr_validate(a, MNL_TYPE_U16) == 0) t->dport = mnl_attr_get_u16(a); break;
    }
    return MNL_CB_OK;
}

static int tuple_attr(const struct nlattr *a, void *data) {
    switch (mnl_attr_get_type(a)) {
    case CTA_TUPLE_IP: mnl_attr_parse_nested(a, ip_attr, data); break;
    case CTA_TUPLE_PROTO: mnl_attr_parse_nested(a, proto_attr, data); break;
    }
    return MNL_CB_OK;
}

static int ct_attr(const struct nlattr *a, void *data) {
    const struct nlattr **original = data;
    if (mnl_attr_get_type(a) == CTA_TUPLE_ORIG) *original = a;
    return MNL_CB_OK;
}

static int ct_message(const struct nlmsghdr *nlh, void *data) {
    struct ct_filter *f = data;
    const struct nlattr *original = NULL;
    mnl_attr_parse(nlh, sizeof(struct nfgenmsg), ct_attr, &original);
    if (!original) return MNL_CB_OK;
    struct tuple_fields t = {0};
    mnl_attr_parse_nested(original, tuple_attr, &t);
    if (t.dst != f->dst || t.protocol != f->protocol || t.dport != f->dport) return MNL_CB_OK;
    if (f->src != 0 && t.src != f->src) return MNL_CB_OK;
    size_t size = original->nla_len;
    if (f->length + MNL_ALIGN(size) > f->capacity) {
        size_t capacity = f->capacity ? f->capacity * 2 : 4096;
        while (f->length + MNL_ALIGN(size) > capacity) capacity *= 2;
        uint8_t *grown = realloc(f->tuples, capacity);
        if (!grown) return MNL_CB_ERROR;
        f->tuples = grown;
        f->capacity = capacity;
    }
    memcpy(f->tuples + f->length, original, size);
    f->length += MNL_ALIGN(size);
    return MNL_CB_OK;
}

static struct nlmsghdr *ct_header(uint8_t *buffer, uint16_t type, uint16_t flags, uint32_t seq) {
    struct nlmsghdr *nlh = mnl_nlmsg_put_header(buffer);
    nlh->nlmsg_type = (NFNL_SUBSYS_CTNETLINK << 8) | type;
    nlh->nlmsg_flags = NLM_F_REQUEST | flags;
    nlh->nlmsg_seq = seq;
    struct nfgenmsg *nfg = mnl_nlmsg_put_extra_header(nlh, sizeof(struct nfgenmsg));
    nfg->nfgen_family = AF_INET;
    nfg->version = NFNETLINK_V0;
    nfg->res_id = 0;
    return nlh;
}

int nfk_conntrack_delete(uint32_t src, uint32_t dst, uint8_t protocol, uint16_t dport, int *deleted) {
    *deleted = 0;
    uint8_t buffer[4096];
    struct ct_filter f = {.src = src, .dst = dst, .protocol = protocol, .dport = dport};
    int rc = request(ct_header(buffer, IPCTNL_MSG_CT_GET, NLM_F_DUMP, next_seq()), ct_message, &f);
    if (rc < 0) { free(f.tuples); return rc; }
    size_t offset = 0;
    while (offset < f.length) {
        const struct nlattr *tuple = (const struct nlattr *)(f.tuples + offset);
        struct nlmsghdr *nlh = ct_header(buffer, IPCTNL_MSG_CT_DELETE, NLM_F_ACK, next_seq());
        mnl_attr_put(nlh, CTA_TUPLE_ORIG | NLA_F_NESTED, tuple->nla_len - sizeof(struct nlattr), mnl_attr_get_payload(tuple));
        int one = request(nlh, NULL, NULL);
        if (one == 0) (*deleted)++;
        else if (one != -ENOENT) rc = one; // gone already is fine
        offset += MNL_ALIGN(tuple->nla_len);
    }
    free(f.tuples);
    return rc;
}
