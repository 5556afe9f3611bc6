// See CTLSClient.h.
#include "CTLSClient.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

struct rdg_tls {
    SSL_CTX *context;
    SSL *ssl;
};

static void describe(char *error, size_t length, const char *step) {
    unsigned long code = ERR_get_error();
    char reason[256] = "";
    if (code != 0) {
        ERR_error_string_n(code, reason, sizeof reason);
    } else if (errno != 0) {
        snprintf(reason, sizeof reason, "%s", strerror(errno));
    } else {
        snprintf(reason, sizeof reason, "the connection closed");
    }
    snprintf(error, length, "%s: %s", step, reason);
    ERR_clear_error();
}

static int is_ip_address(const char *host) {
    unsigned char buffer[16];
    return inet_pton(AF_INET, host, buffer) == 1 || inet_pton(AF_INET6, host, buffer) == 1;
}

static int peer_sha256(SSL *ssl, uint8_t *out) {
    X509 *certificate = SSL_get1_peer_certificate(ssl);
    if (certificate == NULL) return -1;
    unsigned int length = 0;
    int ok = X509_digest(certificate, EVP_sha256(), out, &length) == 1 && length == 32;
    X509_free(certificate);
    return ok ? 0 : -1;
}

rdg_tls *rdg_tls_connect(int fd, const char *host, const char *ca_file, const uint8_t *pin,
                         int timeout_ms, char *error, size_t error_length) {
    ERR_clear_error();
    errno = 0;
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
        snprintf(error, error_length, "cannot make the socket blocking: %s", strerror(errno));
        return NULL;
    }
    struct timeval timeout = { .tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);

    rdg_tls *tls = calloc(1, sizeof *tls);
    if (tls == NULL) {
        snprintf(error, error_length, "out of memory");
        return NULL;
    }
    tls->context = SSL_CTX_new(TLS_client_method());
    if (tls->context == NULL || SSL_CTX_set_min_proto_version(tls->context, TLS1_2_VERSION) != 1) {
        describe(error, error_length, "TLS set-up");
        rdg_tls_free(tls);
        return NULL;
    }
    if (ca_file != NULL) {
        if (SSL_CTX_load_verify_locations(tls->context, ca_file, NULL) != 1) {
            describe(error, error_length, "cannot load the CA file");
            rdg_tls_free(tls);
            return NULL;
        }
        SSL_CTX_set_verify(tls->context, SSL_VERIFY_PEER, NULL);
    } else {
        // A pin is checked after the handshake against the certificate itself.
        SSL_CTX_set_verify(tls->context, SSL_VERIFY_NONE, NULL);
    }
    tls->ssl = SSL_new(tls->context);
    if (tls->ssl == NULL || SSL_set_fd(tls->ssl, fd) != 1) {
        describe(error, error_length, "TLS set-up");
        rdg_tls_free(tls);
        return NULL;
    }
    if (host != NULL && host[0] != '\0') {
        if (!is_ip_address(host)) SSL_set_tlsext_host_name(tls->ssl, host);
        if (ca_file != NULL) {
            X509_VERIFY_PARAM *parameters = SSL_get0_param(tls->ssl);
            int named = is_ip_address(host) ? X509_VERIFY_PARAM_set1_ip_asc(parameters, host)
                                            : X509_VERIFY_PARAM_set1_host(parameters, host, 0);
            if (named != 1) {
                describe(error, error_length, "cannot set the name to verify");
                rdg_tls_free(tls);
                return NULL;
            }
        }
    }
    if (SSL_connect(tls->ssl) != 1) {
        long verified = SSL_get_verify_result(tls->ssl);
        if (ca_file != NULL && verified != X509_V_OK) {
            snprintf(error, error_length, "the broker's certificate does not verify against the CA file: %s",
                     X509_verify_cert_error_string(verified));
            ERR_clear_error();
        } else {
            describe(error, error_length, "TLS handshake");
        }
        rdg_tls_free(tls);
        return NULL;
    }
    if (pin != NULL) {
        uint8_t seen[32];
        if (peer_sha256(tls->ssl, seen) != 0 || memcmp(seen, pin, 32) != 0) {
            snprintf(error, error_length, "the broker's certificate is not the one pinned at enrollment");
            rdg_tls_free(tls);
            return NULL;
        }
    }
    return tls;
}

int rdg_tls_peer_sha256(rdg_tls *tls, uint8_t *out) {
    return peer_sha256(tls->ssl, out);
}

int rdg_tls_write_all(rdg_tls *tls, const void *bytes, size_t length, char *error, size_t error_length) {
    const unsigned char *next = bytes;
    while (length > 0) {
        errno = 0;
        size_t written = 0;
        if (SSL_write_ex(tls->ssl, next, length, &written) != 1) {
            describe(error, error_length, "TLS write");
            return -1;
        }
        next += written;
        length -= written;
    }
    return 0;
}

long rdg_tls_read(rdg_tls *tls, void *buffer, size_t capacity, char *error, size_t error_length) {
    errno = 0;
    size_t got = 0;
    if (SSL_read_ex(tls->ssl, buffer, capacity, &got) == 1) return (long)got;
    int reason = SSL_get_error(tls->ssl, 0);
    if (reason == SSL_ERROR_ZERO_RETURN) return 0;
    // A peer that closes without close_notify after a Connection: close answer.
    if (reason == SSL_ERROR_SYSCALL && errno == 0) {
        ERR_clear_error();
        return 0;
    }
    if (reason == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        return 0;
    }
    describe(error, error_length, errno == EAGAIN || errno == EWOULDBLOCK ? "TLS read timed out" : "TLS read");
    return -1;
}

void rdg_tls_free(rdg_tls *tls) {
    if (tls == NULL) return;
    if (tls->ssl != NULL) {
        SSL_shutdown(tls->ssl);
        SSL_free(tls->ssl);
    }
    if (tls->context != NULL) SSL_CTX_free(tls->context);
    free(tls);
    ERR_clear_error();
}
