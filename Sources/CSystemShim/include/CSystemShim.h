// C shims for the Linux calls and constants Swift's Glibc module does not
// reach: GNU-only calls such as splice(2) and accept4(2), and macros or
// enum-valued constants that Swift imports awkwardly or not at all.
//
// Every function here is a thin wrapper named after the C call with the
// `shim_` prefix. None retries EINTR or interprets errors: that happens in one
// place, `SystemLayer/Syscall.swift`.
#ifndef C_SYSTEM_SHIM_H
#define C_SYSTEM_SHIM_H

#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/epoll.h>

// MARK: errno

int shim_errno(void);
/// flock(2) with LOCK_EX | LOCK_NB: 0, or -1 with errno (EWOULDBLOCK when held).
int shim_flock_exclusive_nonblocking(int fd);
void shim_set_errno(int value);

// MARK: epoll

int shim_epoll_create(void);
int shim_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/// Waits for events and copies them into two parallel arrays, so that Swift
/// never has to deal with the packed `struct epoll_event` layout on x86_64.
int shim_epoll_wait(int epfd, uint32_t *events, uint64_t *data, int maxevents, int timeout_ms);

extern const uint32_t SHIM_EPOLLIN;
extern const uint32_t SHIM_EPOLLOUT;
extern const uint32_t SHIM_EPOLLERR;
extern const uint32_t SHIM_EPOLLHUP;
extern const uint32_t SHIM_EPOLLRDHUP;
extern const uint32_t SHIM_EPOLLET;
extern const uint32_t SHIM_EPOLLEXCLUSIVE;
extern const int SHIM_EPOLL_CTL_ADD;
extern const int SHIM_EPOLL_CTL_MOD;
extern const int SHIM_EPOLL_CTL_DEL;

// MARK: eventfd, pipes, splice

int shim_eventfd(unsigned int initval);
int shim_pipe2(int fds[2]);
int shim_set_pipe_size(int fd, int size);
int shim_get_pipe_size(int fd);
/// splice(2) with SPLICE_F_MOVE | SPLICE_F_NONBLOCK and no offsets.
ssize_t shim_splice(int fd_in, int fd_out, size_t len);

// MARK: sockets

/// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC.
int shim_accept4(int fd, struct sockaddr *addr, socklen_t *len);
/// socket(2) with SOCK_NONBLOCK | SOCK_CLOEXEC.
int shim_socket(int domain, int type, int protocol);
int shim_setsockopt_int(int fd, int level, int name, int value);
int shim_getsockopt_int(int fd, int level, int name, int *value);
/// Sets SO_LINGER to {on, 0 s}, so that close(2) sends a RST.
int shim_set_linger_zero(int fd);

extern const int SHIM_SOCK_STREAM;
extern const int SHIM_SOCK_DGRAM;
extern const int SHIM_SO_REUSEPORT;
extern const int SHIM_SO_REUSEADDR;
extern const int SHIM_SO_KEEPALIVE;
extern const int SHIM_SO_ERROR;
extern const int SHIM_SO_ACCEPTCONN;
extern const int SHIM_SO_RCVBUF;
extern const int SHIM_SO_SNDBUF;
extern const int SHIM_TCP_NODELAY;
extern const int SHIM_TCP_KEEPIDLE;
extern const int SHIM_TCP_KEEPINTVL;
extern const int SHIM_TCP_KEEPCNT;
extern const int SHIM_TCP_USER_TIMEOUT;
extern const int SHIM_IPPROTO_TCP;
extern const int SHIM_IPPROTO_IPV6;
extern const int SHIM_IPV6_V6ONLY;

// MARK: signals and threads

/// Blocks SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2 and SIGPIPE in the calling thread,
/// so that threads started afterwards inherit the mask and the signals are
/// taken only by `shim_wait_signal`.
int shim_block_process_signals(void);
/// Waits for one of the signals blocked by `shim_block_process_signals`,
/// other than SIGPIPE, and returns its number, or -1 on error.
int shim_wait_signal(void);
/// Sends `sig` to this process.
int shim_raise_process(int sig);
int shim_pthread_set_name(const char *name);
// 1 on the process's main thread (gettid() == getpid()), else 0. gettid is
// not in Swift's Glibc module.
int shim_is_main_thread(void);
// setns(fd, CLONE_NEWNET) for the calling thread (not in Swift's Glibc module).
int shim_enter_network_namespace(int fd);
// A per-thread flag: set by threads made for blocking work
// (BlockingExecutor), read by BlockingCallCheck.
void shim_mark_thread_dedicated(void);
int shim_thread_is_dedicated(void);
// Writes `message` and the calling thread's stack (backtrace_symbols_fd) to
// fd 2, skipping `skip` frames, unless a stack with the same first
// `key_frames` return addresses was written before; returns 1 when it wrote.
// For diagnostics.
int shim_print_backtrace_once(const char *message, int skip, int key_frames);

// MARK: resources

/// The soft RLIMIT_NOFILE.
long shim_open_files_limit(void);
/// Sets the soft RLIMIT_NOFILE (tests use this to provoke EMFILE).
int shim_set_open_files_limit(long soft);
/// Monotonic clock in nanoseconds.
uint64_t shim_monotonic_ns(void);


// MARK: descriptor passing (hot upgrade)

/// The most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
#define SHIM_MAX_PASSED_FDS 250
/// socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK): messages keep their bounds.
int shim_seqpacket_pair(int fds[2]);
/// One message with `nfds` descriptors attached (SCM_RIGHTS); MSG_NOSIGNAL.
ssize_t shim_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
/// One message; its descriptors (close-on-exec) in `fds`, their count in
/// `nfds`; `truncated` set when the message or its descriptors did not fit.
ssize_t shim_recv_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds, int *truncated);
/// posix_spawn of `path` with `passfd` at `childfd` in the child (every
/// descriptor above `childfd` closed there), no signal
/// blocked and every disposition at its default. Returns 0 and the pid, or -1 with errno.
int shim_spawn_passing_fd(const char *path, char *const argv[], char *const envp[], int passfd, int childfd, int *pid);
/// waitpid(pid, WNOHANG): 0 while it runs, pid once it ended (`status`: the
/// exit code, or 128 + the signal), -1 with errno.
int shim_reap_child(int pid, int *status);

/// Runs `path` with its standard output into a pipe and waits for it:
/// at most `cap` bytes of that output land in `out` (`*len`; the rest is
/// read and dropped), `*status` is its exit code (128 + signal when
/// killed). stdin and stderr are inherited, nothing else; signals as a
/// shell would start it; `envp` NULL: our environment. Blocking: dedicated
/// threads only.
/// Returns 0, or -1 with errno set (the program could not be started).
int shim_run_capture(const char *path, char *const argv[], char *const envp[],
                     unsigned char *out, size_t cap, size_t *len, int *status);

#endif

// MARK: datagram batches (recvmmsg/sendmmsg)

/// A batch of datagram slots with their headers, addresses and control
/// buffers, allocated once. A receive batch owns a data buffer per slot; a
/// send batch points its slots at a receive batch's buffers, so forwarding a
/// datagram copies no payload in user space.
typedef struct shim_dgram_batch shim_dgram_batch;

/// Creates a batch of `capacity` slots (at most 64); `buffer_size` bytes of
/// data per slot for a receive batch, 0 for a send batch.
shim_dgram_batch *shim_dgram_batch_create(int capacity, int buffer_size);
void shim_dgram_batch_destroy(shim_dgram_batch *batch);
int shim_dgram_batch_capacity(const shim_dgram_batch *batch);

/// recvmmsg(2) into every slot. Returns the number received or -1 (errno set).
int shim_dgram_recv(int fd, shim_dgram_batch *batch);
/// The length of datagram `i` after a receive (may be 0).
size_t shim_dgram_length(const shim_dgram_batch *batch, int i);
/// True when datagram `i` did not fit its buffer and was cut (MSG_TRUNC).
int shim_dgram_truncated(const shim_dgram_batch *batch, int i);
/// The sender of datagram `i`.
const struct sockaddr *shim_dgram_peer(const shim_dgram_batch *batch, int i, socklen_t *length);
/// The local address datagram `i` was sent to, from IP_PKTINFO/IPV6_PKTINFO.
/// Writes an AF_INET/AF_INET6 sockaddr (port 0) into `out` and returns 1, or 0 when absent.
int shim_dgram_local(const shim_dgram_batch *batch, int i, struct sockaddr_storage *out);

/// Empties a send batch.
void shim_dgram_tx_reset(shim_dgram_batch *tx);
int shim_dgram_tx_count(const shim_dgram_batch *tx);
/// Adds datagram `index` of `rx` to `tx`, to `destination` (NULL on a
/// connected socket) and, when `source` is not NULL, from that local address
/// (an IP_PKTINFO/IPV6_PKTINFO control message). Returns 0 when `tx` is full.
int shim_dgram_tx_add(shim_dgram_batch *tx, const shim_dgram_batch *rx, int index,
                      const struct sockaddr *destination, socklen_t destination_length,
                      const struct sockaddr_storage *source);
/// Adds `length` bytes at `base` (which must stay valid until sent) to `tx`,
/// for a connected socket. Returns 0 when `tx` is full.
int shim_dgram_tx_add_buffer(shim_dgram_batch *tx, const void *base, size_t length);
/// Sends the slots from `start` on, all bound for one destination (one flow):
/// a run of two or more equal-sized datagrams (the last may be shorter) goes
/// out as one sendmsg(2) with UDP_SEGMENT (GSO: one trip through the stack
/// for the whole run) while `*gso` is non-zero; other slots go with
/// sendmmsg(2). When the kernel or device refuses GSO, `*gso` is set to 0 and
/// the run is sent datagram by datagram. Returns the number of slots sent
/// or -1 with errno set.
int shim_dgram_send_flow(int fd, shim_dgram_batch *tx, int start, int *gso);
/// sendmmsg(2) of the slots from `start` on. Returns the number sent or -1.
int shim_dgram_send(int fd, shim_dgram_batch *tx, int start);

/// Asks the kernel for the destination address of each datagram received on
/// `fd` (IP_PKTINFO or IPV6_RECVPKTINFO).
int shim_enable_pktinfo(int fd, int family);
/// Copies up to `length` bytes of a send batch's first slot into `out` (tests only).
size_t shim_dgram_copy_first(const shim_dgram_batch *tx, void *out, size_t length);
/// The payload length of queued slot `i` of a send batch.
size_t shim_dgram_tx_length(const shim_dgram_batch *tx, int i);
