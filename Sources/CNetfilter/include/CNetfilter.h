// The kernel path's netlink layer (issue 12), on libnftnl and libmnl: the
// product's own nftables table (its sets, maps, chains and rules), element
// changes in atomic batches, element dumps with their counters, and
// conntrack entries found and deleted through ctnetlink. IPv4 only.
//
// Everything here builds or sends netlink messages; the decisions (which
// element, which timeout) are made in Swift (`KernelPath`). Every function
// returns 0 or a negative errno; no pointer it hands out outlives the
// object it came from.
#ifndef CNETFILTER_H
#define CNETFILTER_H

#include <stddef.h>
#include <stdint.h>

// The table's layout, as `nft list table inet NAME` shows it:
//
//   set publics        { type ipv4_addr }                       the gateway's public addresses
//   map dnat_open      { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; counter }
//   map dnat_client    { type ipv4_addr . ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; counter }
//   set traffic_open   { type ipv4_addr . inet_proto . inet_service; flags timeout; counter }
//   set traffic_client { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags timeout; counter }
//   chain prerouting   { type nat hook prerouting priority dstnat
//       dnat ip to ip saddr . ip daddr . meta l4proto . th dport map @dnat_client
//       dnat ip to ip daddr . meta l4proto . th dport map @dnat_open }
//   chain postrouting  { type nat hook postrouting priority srcnat
//       ct status dnat ct original ip daddr @publics masquerade }
//   chain forward      { type filter hook forward priority filter
//       ct original saddr . daddr . protocol . proto-dst @traffic_client
//       ct original daddr . protocol . proto-dst @traffic_open }
//
// Keys and data are the registers' bytes: each field in 4 bytes, network
// order, the protocol number in the first byte of its 4, a port in the
// first 2 of its 4.
#define NFK_SET_PUBLICS "publics"
#define NFK_MAP_OPEN "dnat_open"
#define NFK_MAP_CLIENT "dnat_client"
#define NFK_SET_TRAFFIC_OPEN "traffic_open"
#define NFK_SET_TRAFFIC_CLIENT "traffic_client"

typedef struct nfk_batch nfk_batch;

// A new, empty batch (the BEGIN message is written). NULL when out of memory.
nfk_batch *nfk_batch_new(void);
void nfk_batch_free(nfk_batch *batch);
// Messages in the batch, BEGIN and END excluded.
int nfk_batch_count(const nfk_batch *batch);
// The batch's bytes, END included (written on the first call; no message
// may be added after). For sending, and for tests that check the bytes.
const uint8_t *nfk_batch_bytes(nfk_batch *batch, size_t *length);

// Deletes the table (and everything in it).
int nfk_batch_delete_table(nfk_batch *batch, const char *table);
// Creates the table with its sets, maps, chains and rules (it must not exist).
int nfk_batch_create_table(nfk_batch *batch, const char *table);
// Adds an element; `data` NULL for a set. `timeout_ms` 0 means none. A map
// element (with data) must not exist yet (NLM_F_EXCL); a set element that
// exists is kept.
int nfk_batch_add_element(nfk_batch *batch, const char *table, const char *set, const void *key, uint32_t key_len,
                          const void *data, uint32_t data_len, uint64_t timeout_ms);
// Deletes an element.
int nfk_batch_delete_element(nfk_batch *batch, const char *table, const char *set, const void *key, uint32_t key_len);

// Sends the batch in the caller's network namespace and reads every answer.
// Returns 0, or the first error as a negative errno, with *failed set to the
// 0-based index of the message that failed (-1 when none is known). A
// batch is all or nothing: on an error the kernel applied none of it.
int nfk_send(nfk_batch *batch, int *failed);

// 1 when the table exists, 0 when not, or a negative errno.
int nfk_table_exists(const char *table);

// One element of a dump. `expires_ms` is what is left of its timeout.
typedef void (*nfk_element_fn)(void *context, const uint8_t *key, uint32_t key_len, const uint8_t *data, uint32_t data_len,
                               uint64_t timeout_ms, uint64_t expires_ms, uint64_t packets, uint64_t bytes);
// Calls `fn` for each element of `set`. -ENOENT when the table or set is missing.
int nfk_dump_elements(const char *table, const char *set, nfk_element_fn fn, void *context);

// Deletes the conntrack entries (IPv4) whose original direction goes to
// `dst`:`dport` over `protocol`, and, when `src` is not 0, comes from `src`.
// Addresses and the port in network order. *deleted counts them.
int nfk_conntrack_delete(uint32_t src, uint32_t dst, uint8_t protocol, uint16_t dport, int *deleted);

#endif
