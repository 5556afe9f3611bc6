// A blocking TLS client on an already connected socket, on the system's
// OpenSSL: the gateway's calls to the broker (registration, heartbeats).
// Two ways to trust the server: a CA file (the chain must verify and name
// the host), or a pinned SHA-256 of the server certificate's DER (what the
// gateway learned at enrollment). TLS 1.2 or later.
#ifndef CTLSCLIENT_H
#define CTLSCLIENT_H

#include <stddef.h>
#include <stdint.h>

typedef struct rdg_tls rdg_tls;

/// Handshakes on the connected socket `fd` (made blocking, with
/// `timeout_ms` for every read and write). `host` goes in SNI (when a name)
/// and is checked against the certificate with `ca_file`. With `pin`
/// (32 bytes) the certificate must hash to it; with neither, nothing is
/// verified (only to learn a certificate's hash: enrollment's first pin).
/// Returns NULL with a sentence in `error` on failure.
rdg_tls *rdg_tls_connect(int fd, const char *host, const char *ca_file, const uint8_t *pin,
                         int timeout_ms, char *error, size_t error_length);

/// SHA-256 of the server certificate's DER into `out` (32 bytes); 0 on success.
int rdg_tls_peer_sha256(rdg_tls *tls, uint8_t *out);

/// Writes all of `length` bytes; returns 0, or -1 with a sentence in `error`.
int rdg_tls_write_all(rdg_tls *tls, const void *bytes, size_t length, char *error, size_t error_length);

/// Reads up to `capacity` bytes: >0 read, 0 at the end of the stream
/// (close_notify or the peer closing), -1 with a sentence in `error`.
long rdg_tls_read(rdg_tls *tls, void *buffer, size_t capacity, char *error, size_t error_length);

/// Sends close_notify (best effort) and frees everything; does not close `fd`.
void rdg_tls_free(rdg_tls *tls);

#endif
