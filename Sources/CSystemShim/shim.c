// See CSystemShim.h. _GNU_SOURCE exposes splice(2), accept4(2), pipe2(2) and
// F_SETPIPE_SZ, which Swift's Glibc module leaves out.
#define _GNU_SOURCE
#include "CSystemShim.h"

#include <errno.h>
#include <execinfo.h>
#include <string.h>
#include <fcntl.h>
#include <sys/file.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <spawn.h>

int shim_errno(void) { return errno; }
int shim_flock_exclusive_nonblocking(int fd) { return flock(fd, LOCK_EX | LOCK_NB); }
void shim_set_errno(int value) { errno = value; }

// MARK: epoll

int shim_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int shim_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = { .events = events, .data.u64 = data };
    return epoll_ctl(epfd, op, fd, &ev);
}

int shim_epoll_wait(int epfd, uint32_t *events, uint64_t *data, int maxevents, int timeout_ms) {
    // 256 matches the largest batch the event loop asks for.
    struct epoll_event buffer[256];
    if (maxevents > 256) maxevents = 256;
    int n = epoll_wait(epfd, buffer, maxevents, timeout_ms);
    for (int i = 0; i < n; i++) {
        events[i] = buffer[i].events;
        data[i] = buffer[i].data.u64;
    }
    return n;
}

const uint32_t SHIM_EPOLLIN = EPOLLIN;
const uint32_t SHIM_EPOLLOUT = EPOLLOUT;
const uint32_t SHIM_EPOLLERR = EPOLLERR;
const uint32_t SHIM_EPOLLHUP = EPOLLHUP;
const uint32_t SHIM_EPOLLRDHUP = EPOLLRDHUP;
const uint32_t SHIM_EPOLLET = EPOLLET;
const uint32_t SHIM_EPOLLEXCLUSIVE = EPOLLEXCLUSIVE;
const int SHIM_EPOLL_CTL_ADD = EPOLL_CTL_ADD;
const int SHIM_EPOLL_CTL_MOD = EPOLL_CTL_MOD;
const int SHIM_EPOLL_CTL_DEL = EPOLL_CTL_DEL;

// MARK: eventfd, pipes, splice

int shim_eventfd(unsigned int initval) { return eventfd(initval, EFD_NONBLOCK | EFD_CLOEXEC); }
int shim_pipe2(int fds[2]) { return pipe2(fds, O_NONBLOCK | O_CLOEXEC); }
int shim_set_pipe_size(int fd, int size) { return fcntl(fd, F_SETPIPE_SZ, size); }
int shim_get_pipe_size(int fd) { return fcntl(fd, F_GETPIPE_SZ); }

ssize_t shim_splice(int fd_in, int fd_out, size_t len) {
    return splice(fd_in, NULL, fd_out, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}

// MARK: sockets

int shim_accept4(int fd, struct sockaddr *addr, socklen_t *len) {
    return accept4(fd, addr, len, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int shim_socket(int domain, int type, int protocol) {
    return socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
}

int shim_setsockopt_int(int fd, int level, int name, int value) {
    return setsockopt(fd, level, name, &value, sizeof(value));
}

int shim_getsockopt_int(int fd, int level, int name, int *value) {
    socklen_t len = sizeof(*value);
    return getsockopt(fd, level, name, value, &len);
}

int shim_set_linger_zero(int fd) {
    struct linger l = { .l_onoff = 1, .l_linger = 0 };
    return setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
}

const int SHIM_SOCK_STREAM = SOCK_STREAM;
const int SHIM_SOCK_DGRAM = SOCK_DGRAM;
const int SHIM_SO_REUSEPORT = SO_REUSEPORT;
const int SHIM_SO_REUSEADDR = SO_REUSEADDR;
const int SHIM_SO_KEEPALIVE = SO_KEEPALIVE;
const int SHIM_SO_ERROR = SO_ERROR;
const int SHIM_SO_ACCEPTCONN = SO_ACCEPTCONN;
const int SHIM_SO_RCVBUF = SO_RCVBUF;
const int SHIM_SO_SNDBUF = SO_SNDBUF;
const int SHIM_TCP_NODELAY = TCP_NODELAY;
const int SHIM_TCP_KEEPIDLE = TCP_KEEPIDLE;
const int SHIM_TCP_KEEPINTVL = TCP_KEEPINTVL;
const int SHIM_TCP_KEEPCNT = TCP_KEEPCNT;
const int SHIM_TCP_USER_TIMEOUT = TCP_USER_TIMEOUT;
const int SHIM_IPPROTO_TCP = IPPROTO_TCP;
const int SHIM_IPPROTO_IPV6 = IPPROTO_IPV6;
const int SHIM_IPV6_V6ONLY = IPV6_V6ONLY;

// MARK: signals and threads

static void fill_process_signals(sigset_t *set) {
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    sigaddset(set, SIGUSR1);
    sigaddset(set, SIGUSR2);
}

int shim_block_process_signals(void) {
    sigset_t set;
    fill_process_signals(&set);
    sigaddset(&set, SIGPIPE);
    return pthread_sigmask(SIG_BLOCK, &set, NULL);
}

int shim_wait_signal(void) {
    sigset_t set;
    fill_process_signals(&set);
    int sig = 0;
    int rc = sigwait(&set, &sig);
    return rc == 0 ? sig : -1;
}

int shim_raise_process(int sig) { return kill(getpid(), sig); }

int shim_pthread_set_name(const char *name) { return pthread_setname_np(pthread_self(), name); }

int shim_is_main_thread(void) { return gettid() == getpid(); }

int shim_enter_network_namespace(int fd) { return setns(fd, CLONE_NEWNET); }

static __thread int thread_is_dedicated = 0;
void shim_mark_thread_dedicated(void) { thread_is_dedicated = 1; }
int shim_thread_is_dedicated(void) { return thread_is_dedicated; }

int shim_print_backtrace_once(const char *message, int skip, int key_frames) {
    // A small table of stacks already written; a race between two threads
    // at most writes one stack twice.
    static uint64_t seen[512];
    static int seen_count = 0;
    void *frames[48];
    int count = backtrace(frames, 48);
    uint64_t key = 1469598103934665603ULL;
    for (int i = skip; i < count && i < skip + key_frames; i++) {
        key = (key ^ (uint64_t)(uintptr_t)frames[i]) * 1099511628211ULL;
    }
    int n = __atomic_load_n(&seen_count, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n && i < 512; i++) {
        if (seen[i] == key) return 0;
    }
    int slot = __atomic_fetch_add(&seen_count, 1, __ATOMIC_ACQ_REL);
    if (slot < 512) seen[slot] = key;
    ssize_t ignored = write(2, message, strlen(message));
    (void)ignored;
    if (count > skip) backtrace_symbols_fd(frames + skip, count - skip, 2);
    return 1;
}

// MARK: resources

long shim_open_files_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return -1;
    return (long)rl.rlim_cur;
}

int shim_set_open_files_limit(long soft) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return -1;
    rl.rlim_cur = (rlim_t)soft;
    return setrlimit(RLIMIT_NOFILE, &rl);
}

uint64_t shim_monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// MARK: datagram batches

#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <netinet/udp.h>
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
/* The kernel's limit on segments per GSO send (UDP_MAX_SEGMENTS). */
#define SHIM_GSO_MAX_SEGMENTS 64
/* IPv4's largest UDP payload; a GSO send must not exceed it in total. */
#define SHIM_GSO_MAX_BYTES 65507

#define SHIM_DGRAM_MAX 64
// Room for one in6_pktinfo control message (the larger of the two).
#define SHIM_CONTROL_SIZE 64

struct shim_dgram_batch {
    int capacity;
    int buffer_size;
    int count;
    unsigned char *data;
    struct mmsghdr headers[SHIM_DGRAM_MAX];
    struct iovec iov[SHIM_DGRAM_MAX];
    struct sockaddr_storage addresses[SHIM_DGRAM_MAX];
    _Alignas(struct cmsghdr) unsigned char control[SHIM_DGRAM_MAX][SHIM_CONTROL_SIZE];
};

_Static_assert(sizeof(struct in6_pktinfo) + sizeof(struct cmsghdr) + 16 <= SHIM_CONTROL_SIZE, "control buffer too small");

shim_dgram_batch *shim_dgram_batch_create(int capacity, int buffer_size) {
    if (capacity < 1 || capacity > SHIM_DGRAM_MAX || buffer_size < 0) return NULL;
    shim_dgram_batch *b = calloc(1, sizeof(*b));
    if (!b) return NULL;
    b->capacity = capacity;
    b->buffer_size = buffer_size;
    if (buffer_size > 0) {
        b->data = malloc((size_t)capacity * (size_t)buffer_size);
        if (!b->data) { free(b); return NULL; }
    }
    return b;
}

void shim_dgram_batch_destroy(shim_dgram_batch *b) {
    if (!b) return;
    free(b->data);
    free(b);
}

int shim_dgram_batch_capacity(const shim_dgram_batch *b) { return b->capacity; }

int shim_dgram_recv(int fd, shim_dgram_batch *b) {
    for (int i = 0; i < b->capacity; i++) {
        b->iov[i].iov_base = b->data + (size_t)i * (size_t)b->buffer_size;
        b->iov[i].iov_len = (size_t)b->buffer_size;
        struct msghdr *m = &b->headers[i].msg_hdr;
        m->msg_name = &b->addresses[i];
        m->msg_namelen = sizeof(b->addresses[i]);
        m->msg_iov = &b->iov[i];
        m->msg_iovlen = 1;
        m->msg_control = b->control[i];
        m->msg_controllen = SHIM_CONTROL_SIZE;
        m->msg_flags = 0;
        b->headers[i].msg_len = 0;
    }
    int n = recvmmsg(fd, b->headers, (unsigned int)b->capacity, 0, NULL);
    b->count = n > 0 ? n : 0;
    return n;
}

size_t shim_dgram_length(const shim_dgram_batch *b, int i) { return b->headers[i].msg_len; }

int shim_dgram_truncated(const shim_dgram_batch *b, int i) {
    return (b->headers[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
}

const struct sockaddr *shim_dgram_peer(const shim_dgram_batch *b, int i, socklen_t *length) {
    *length = b->headers[i].msg_hdr.msg_namelen;
    return (const struct sockaddr *)&b->addresses[i];
}

int shim_dgram_local(const shim_dgram_batch *b, int i, struct sockaddr_storage *out) {
    const struct msghdr *m = &b->headers[i].msg_hdr;
    for (struct cmsghdr *c = CMSG_FIRSTHDR((struct msghdr *)m); c; c = CMSG_NXTHDR((struct msghdr *)m, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
            struct in_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof(info));
            struct sockaddr_in *sin = (struct sockaddr_in *)out;
            memset(sin, 0, sizeof(*sin));
            sin->sin_family = AF_INET;
            sin->sin_addr = info.ipi_addr;
            return 1;
        }
        if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
            struct in6_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof(info));
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
            memset(sin6, 0, sizeof(*sin6));
            sin6->sin6_family = AF_INET6;
            sin6->sin6_addr = info.ipi6_addr;
            return 1;
        }
    }
    return 0;
}

void shim_dgram_tx_reset(shim_dgram_batch *tx) { tx->count = 0; }
int shim_dgram_tx_count(const shim_dgram_batch *tx) { return tx->count; }

int shim_dgram_tx_add(shim_dgram_batch *tx, const shim_dgram_batch *rx, int index,
                      const struct sockaddr *destination, socklen_t destination_length,
                      const struct sockaddr_storage *source) {
    if (tx->count >= tx->capacity) return 0;
    int i = tx->count++;
    tx->iov[i].iov_base = rx->iov[index].iov_base;
    tx->iov[i].iov_len = rx->headers[index].msg_len;
    struct msghdr *m = &tx->headers[i].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_iov = &tx->iov[i];
    m->msg_iovlen = 1;
    if (destination) {
        if (destination_length > sizeof(tx->addresses[i])) destination_length = sizeof(tx->addresses[i]);
        memcpy(&tx->addresses[i], destination, destination_length);
        m->msg_name = &tx->addresses[i];
        m->msg_namelen = destination_length;
    }
    if (source && source->ss_family == AF_INET) {
        m->msg_control = tx->control[i];
        m->msg_controllen = CMSG_SPACE(sizeof(struct in_pktinfo));
        memset(tx->control[i], 0, SHIM_CONTROL_SIZE);
        struct cmsghdr *c = CMSG_FIRSTHDR(m);
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
        struct in_pktinfo info;
        memset(&info, 0, sizeof(info));
        info.ipi_spec_dst = ((const struct sockaddr_in *)source)->sin_addr;
        memcpy(CMSG_DATA(c), &info, sizeof(info));
    } else if (source && source->ss_family == AF_INET6) {
        m->msg_control = tx->control[i];
        m->msg_controllen = CMSG_SPACE(sizeof(struct in6_pktinfo));
        memset(tx->control[i], 0, SHIM_CONTROL_SIZE);
        struct cmsghdr *c = CMSG_FIRSTHDR(m);
        c->cmsg_level = IPPROTO_IPV6;
        c->cmsg_type = IPV6_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(struct in6_pktinfo));
        struct in6_pktinfo info;
        memset(&info, 0, sizeof(info));
        info.ipi6_addr = ((const struct sockaddr_in6 *)source)->sin6_addr;
        memcpy(CMSG_DATA(c), &info, sizeof(info));
    }
    tx->headers[i].msg_len = 0;
    return 1;
}

int shim_dgram_tx_add_buffer(shim_dgram_batch *tx, const void *base, size_t length) {
    if (tx->count >= tx->capacity) return 0;
    int i = tx->count++;
    tx->iov[i].iov_base = (void *)base;
    tx->iov[i].iov_len = length;
    struct msghdr *m = &tx->headers[i].msg_hdr;
    memset(m, 0, sizeof(*m));
    m->msg_iov = &tx->iov[i];
    m->msg_iovlen = 1;
    tx->headers[i].msg_len = 0;
    return 1;
}

static int shim_run_length(const shim_dgram_batch *tx, int start) {
    size_t segment = tx->iov[start].iov_len;
    /* Segments must fit the path MTU (else EINVAL); 1452 fits IPv6 over 1500. */
    if (segment == 0 || segment > 1452) return 1;
    size_t total = segment;
    int j = start + 1;
    while (j < tx->count && j - start < SHIM_GSO_MAX_SEGMENTS) {
        size_t length = tx->iov[j].iov_len;
        if (length == 0 || length > segment || total + length > SHIM_GSO_MAX_BYTES) break;
        total += length;
        j++;
        if (length < segment) break; /* a shorter datagram ends the run */
    }
    return j - start;
}

int shim_dgram_send_flow(int fd, shim_dgram_batch *tx, int start, int *gso) {
    if (start >= tx->count) return 0;
    if (*gso) {
        int run = shim_run_length(tx, start);
        if (run >= 2) {
            struct msghdr m = tx->headers[start].msg_hdr;
            unsigned char control[SHIM_CONTROL_SIZE + CMSG_SPACE(sizeof(uint16_t))] __attribute__((aligned(8)));
            memset(control, 0, sizeof(control));
            size_t used = 0;
            if (m.msg_control && m.msg_controllen > 0) {
                memcpy(control, m.msg_control, m.msg_controllen);
                used = m.msg_controllen;
            }
            struct cmsghdr *c = (struct cmsghdr *)(control + used);
            c->cmsg_level = SOL_UDP;
            c->cmsg_type = UDP_SEGMENT;
            c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)tx->iov[start].iov_len;
            memcpy(CMSG_DATA(c), &segment, sizeof(segment));
            m.msg_control = control;
            m.msg_controllen = used + CMSG_SPACE(sizeof(uint16_t));
            m.msg_iov = &tx->iov[start];
            m.msg_iovlen = (size_t)run;
            ssize_t sent = sendmsg(fd, &m, 0);
            if (sent >= 0) return run;
            if (errno == EINVAL) {
                /* e.g. a path MTU below the segment size: this run goes one by one. */
                return sendmmsg(fd, tx->headers + start, (unsigned int)run, 0);
            }
            if (errno != EIO && errno != ENOPROTOOPT && errno != EOPNOTSUPP) return -1;
            *gso = 0; /* no GSO on this system: datagram by datagram from now on */
        } else {
            /* Singles up to the next run, with one sendmmsg. */
            int end = start + 1;
            while (end < tx->count && shim_run_length(tx, end) < 2) end++;
            return sendmmsg(fd, tx->headers + start, (unsigned int)(end - start), 0);
        }
    }
    return sendmmsg(fd, tx->headers + start, (unsigned int)(tx->count - start), 0);
}

int shim_dgram_send(int fd, shim_dgram_batch *tx, int start) {
    if (start >= tx->count) return 0;
    return sendmmsg(fd, tx->headers + start, (unsigned int)(tx->count - start), 0);
}

int shim_enable_pktinfo(int fd, int family) {
    int on = 1;
    if (family == AF_INET6) return setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &on, sizeof(on));
    return setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &on, sizeof(on));
}

size_t shim_dgram_copy_first(const shim_dgram_batch *tx, void *out, size_t length) {
    if (tx->count < 1) return 0;
    size_t n = tx->iov[0].iov_len < length ? tx->iov[0].iov_len : length;
    memcpy(out, tx->iov[0].iov_base, n);
    return n;
}

size_t shim_dgram_tx_length(const shim_dgram_batch *tx, int i) { return tx->iov[i].iov_len; }

// MARK: descriptor passing (hot upgrade)

int shim_seqpacket_pair(int fds[2]) {
    return socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, fds);
}

ssize_t shim_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > SHIM_MAX_PASSED_FDS) { errno = EINVAL; return -1; }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    union { struct cmsghdr align; unsigned char bytes[CMSG_SPACE(sizeof(int) * SHIM_MAX_PASSED_FDS)]; } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

ssize_t shim_recv_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    union { struct cmsghdr align; unsigned char bytes[CMSG_SPACE(sizeof(int) * SHIM_MAX_PASSED_FDS)]; } control;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes, .msg_controllen = sizeof control.bytes };
    *nfds = 0;
    *truncated = 0;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *passed = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            // More than the caller can hold: close them rather than leak.
            if (*nfds < maxfds) fds[(*nfds)++] = passed[i]; else close(passed[i]);
        }
    }
    if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) *truncated = 1;
    return n;
}

// posix_spawn of `path` with `passfd` at `childfd` in the child, without
// close-on-exec (dup2 clears it on the new descriptor), every descriptor
// from `closefrom` up closed there (descriptors made without close-on-exec
// by libraries, a listening socket among them, must not stay open in it),
// no signal blocked and every disposition at its default, as a process
// started by a shell would be (ours block some and ignore SIGPIPE).
// `envp` NULL: our environment. Returns 0 and the pid, or -1 with errno.
static int spawn_with_fd(const char *path, char *const argv[], char *const envp[],
                         int passfd, int childfd, int closefrom, pid_t *pid) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    int rc = posix_spawn_file_actions_init(&actions);
    if (rc != 0) { errno = rc; return -1; }
    rc = posix_spawnattr_init(&attr);
    if (rc != 0) { posix_spawn_file_actions_destroy(&actions); errno = rc; return -1; }
    int source = passfd;
    if (passfd == childfd) {
        // dup2 onto itself would keep close-on-exec: go through another number.
        source = fcntl(passfd, F_DUPFD_CLOEXEC, closefrom);
        if (source < 0) { posix_spawn_file_actions_destroy(&actions); posix_spawnattr_destroy(&attr); return -1; }
    }
    rc = posix_spawn_file_actions_adddup2(&actions, source, childfd);
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&actions, closefrom);
    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&attr, &empty);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);
    if (rc == 0) rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (rc == 0) rc = posix_spawn(pid, path, &actions, &attr, argv, envp ? envp : environ);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (source != passfd) close(source);
    if (rc != 0) { errno = rc; return -1; }
    return 0;
}

// A wait status as an exit code: 128 + the signal when killed.
static int exit_code(int raw) {
    return WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + (WIFSIGNALED(raw) ? WTERMSIG(raw) : 0);
}

int shim_spawn_passing_fd(const char *path, char *const argv[], char *const envp[], int passfd, int childfd, int *pid) {
    pid_t child = 0;
    if (spawn_with_fd(path, argv, envp, passfd, childfd, childfd + 1, &child) != 0) return -1;
    *pid = (int)child;
    return 0;
}

int shim_reap_child(int pid, int *status) {
    int raw = 0;
    int rc = waitpid(pid, &raw, WNOHANG);
    if (rc <= 0) return rc;
    *status = exit_code(raw);
    return rc;
}

int shim_run_capture(const char *path, char *const argv[], char *const envp[],
                     unsigned char *out, size_t cap, size_t *len, int *status) {
    int fds[2];
    *len = 0;
    if (pipe2(fds, O_CLOEXEC) != 0) return -1;
    // The pipe's write end is the child's stdout; stdin and stderr are ours.
    pid_t child = 0;
    int spawned = spawn_with_fd(path, argv, envp, fds[1], 1, 3, &child);
    int saved = errno;
    close(fds[1]);
    if (spawned != 0) { close(fds[0]); errno = saved; return -1; }
    unsigned char drop[4096];
    for (;;) {
        unsigned char *into = *len < cap ? out + *len : drop;
        size_t room = *len < cap ? cap - *len : sizeof drop;
        ssize_t n = read(fds[0], into, room);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        if (into != drop) *len += (size_t)n;
    }
    close(fds[0]);
    int raw = 0;
    while (waitpid(child, &raw, 0) < 0) {
        if (errno != EINTR) return -1;
    }
    *status = exit_code(raw);
    return 0;
}
