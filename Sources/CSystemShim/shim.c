// See CSystemShim.h. _GNU_SOURCE exposes splice(2), accept4(2), pipe2(2) and
// F_SETPIPE_SZ, which Swift's Glibc module leaves out.
#define _GNU_SOURCE
#include "CSystemShim.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#include <netinet/tcp.h>
#include <sys/eventfd.h>
#include <sys/resource.h>

int shim_errno(void) { return errno; }
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
