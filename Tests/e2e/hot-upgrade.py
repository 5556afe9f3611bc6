#!/usr/bin/python3
"""End-to-end test of the gateway's hot upgrade: on SIGUSR2 the running
gateway starts the binary now at the path it was started from, with the same
arguments, hands it every listener and every established session (bytes in
flight included) and exits 0; clients notice nothing. A failed upgrade (the
new binary exits at once, is not executable, or the config no longer loads)
is logged as `upgrade failed:` and changes nothing.

The test is the desktop itself: a TCP echo server that checks every byte it
receives against the stream its client was to send (each session a
deterministic pseudo-random stream of its own), and a UDP echo server on the
same port number. The gateway forwards one loopback port to both
(`protocol = tcp+udp`) and serves /metrics, whose gauges give the exact
number of sessions and UDP flows the gateway holds before each upgrade.

Steps:
  start     BIN copied to TMP/leostream-gateway (PATH), started as
            `PATH serve --config CONF --state-dir TMP/state`; `ready: ... pid=`
  upgrade   100 sessions stream (256-4,096 B every 50 ms each, ~4 MB/s in
            all) and a UDP flow pings every 2 ms; PATH replaced by a fresh
            copy of BIN (new inode), SIGUSR2: the new process logs `took over
            100 connection(s) [and F UDP flow(s)] from pid OLD` and its own
            `ready: ... pid=NEW`, the old one logs `handed over 100
            connection(s) ... to pid NEW` and exits 0; NEW runs the new inode
            with the same arguments; F (when logged) is what /metrics counted
            just before the signal; streaming goes on 2 s, then every client
            half-closes and reads to EOF: every byte back, in order, none
            missing or extra, no reset or early EOF, and the echo server got
            exactly what was sent. New TCP connections, a new UDP flow and the
            UDP flow kept open across the upgrade all echo afterwards; the
            kept flow reaches the desktop from one upstream address throughout
            (handed over, never re-created); /metrics (now the new process)
            counts the 100 sessions and F + 1 flows. The longest gap between
            echo chunks around the upgrade is printed (never asserted).
  failed    while 10 sessions stream: PATH becomes `#!/bin/sh exit 1`, then a
            non-executable file, then BIN again with a config that no longer
            loads; each SIGUSR2 -> `upgrade failed:`, same pid alive, no
            zombie child left, new connections still relayed; the 10 sessions
            verify byte for byte.
  again     PATH and config restored; a second upgrade with 20 live sessions.
  stop      SIGTERM: the gateway (by then the grandchild of the one started)
            exits 0.

The test makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so an
upgraded gateway whose parent exited becomes the test's child: its exit
status can be read too, and nothing is left a zombie.

Usage: Tests/e2e/hot-upgrade.py BIN [--verbose] [--harness-only]
  BIN             the leostream-gateway binary to test
  --verbose       echo the gateway's log lines as they come
  --harness-only  send no SIGUSR2: the same traffic and byte checks with a
                  pause where each upgrade would be (checks the test itself
                  against a gateway without hot upgrade)
Exit status 0 when every check passed. Every wait polls up to a generous
deadline (RDG_TEST_DEADLINE seconds, default 60). About 25 s on an idle machine.
"""
import argparse
import ctypes
import hashlib
import heapq
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request

import testports

DEADLINE = float(os.environ.get("RDG_TEST_DEADLINE", "60"))
NAME = "hot-upgrade"

# Load shape: modest on purpose (2-core machines, a debug gateway): ~4 MB/s
# each way for 100 sessions, enough to keep bytes in flight at any moment.
CHUNK_MIN, CHUNK_MAX = 256, 4096
SEND_INTERVAL = 0.05          # seconds between two chunks of one session
UDP_INTERVAL = 0.002          # seconds between two datagrams of the kept flow: several land
                              # inside the handover itself (a few ms), where flows are at risk
MOVED_BEFORE_UPGRADE = 16384  # bytes echoed per session before upgrading

failures = []
passed = 0


# ---------------------------------------------------------------- checks

class Fatal(Exception):
    """A step failed in a way that makes the following steps meaningless."""


def ok(what):
    global passed
    passed += 1
    print(f"[{NAME}] ok: {what}", file=sys.stderr)


def fail(what):
    failures.append(what)
    print(f"[{NAME}] FAIL: {what}", file=sys.stderr)


def check(condition, what):
    (ok if condition else fail)(what)
    return condition


def require(condition, what):
    if not check(condition, what):
        raise Fatal(what)


def info(what):
    print(f"[{NAME}] {what}", file=sys.stderr)


def eventually(condition, seconds=DEADLINE):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---------------------------------------------------------------- the byte streams

MAGIC = b"HUPG"


def session_header(sid):
    """The first 8 bytes of every session: tells the echo server which stream to expect."""
    return MAGIC + sid.to_bytes(4, "big")


class SessionStream:
    """The bytes session `sid` sends: its header, then a pseudo-random stream
    (SHAKE-128 of the session id and a block number, 16 KiB blocks), read
    sequentially in chunks of any size. The client, the echo server and the
    client's check of the echo each walk their own copy."""

    BLOCK = 16384

    def __init__(self, sid):
        self.prefix = session_header(sid)
        self.key = b"hot-upgrade/%d/" % sid
        self.offset = 0
        self._index = -1
        self._block = b""

    def take(self, n):
        parts = []
        if self.offset < len(self.prefix):
            head = self.prefix[self.offset:self.offset + n]
            parts.append(head)
            self.offset += len(head)
            n -= len(head)
        while n > 0:
            index, within = divmod(self.offset - len(self.prefix), self.BLOCK)
            if index != self._index:
                self._block = hashlib.shake_128(self.key + index.to_bytes(8, "big")).digest(self.BLOCK)
                self._index = index
            piece = self._block[within:within + n]
            parts.append(piece)
            self.offset += len(piece)
            n -= len(piece)
        return b"".join(parts)


class Verifier:
    """Compares what arrives with what a SessionStream says must arrive;
    keeps the first difference (content or order: both change the bytes)."""

    def __init__(self, sid):
        self.expected = SessionStream(sid)
        self.count = 0
        self.error = None

    def feed(self, data):
        if self.error is None:
            want = self.expected.take(len(data))
            if data != want:
                i = next(i for i in range(len(data)) if data[i] != want[i])
                self.error = f"byte {self.count + i} differs (got {data[i]:#04x}, expected {want[i]:#04x})"
        self.count += len(data)


# ---------------------------------------------------------------- the desktop: echo servers

class ServerRecord:
    """What the echo server saw of one session."""

    def __init__(self):
        self.received = 0
        self.eof = False        # the client's half-close arrived (FIN, not a reset)
        self.error = None


class EchoServer(threading.Thread):
    """TCP echo in one selector loop: sends back exactly what it receives,
    checks it against the session's stream as it goes, and closes once the
    client half-closed and everything was echoed."""

    BACKLOG_LIMIT = 1 << 20   # stop reading a session whose echo is not being read

    def __init__(self, listener):
        super().__init__(daemon=True)
        self.listener = listener
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.records = {}       # sid -> ServerRecord
        self.errors = []        # connections that never named a session
        self.crash = None
        self.running = True

    def run(self):
        try:
            while self.running:
                for key, mask in self.selector.select(0.1):
                    if key.data is None:
                        self._accept()
                    else:
                        self._serve(key.data, mask)
        except Exception:
            self.crash = traceback.format_exc()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            conn = _ServerConn(sock)
            self.selector.register(sock, selectors.EVENT_READ, conn)
            conn.events = selectors.EVENT_READ

    def _serve(self, conn, mask):
        if mask & selectors.EVENT_READ:
            self._read(conn)
        if conn.sock is not None and conn.out:
            try:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as error:
                self._drop(conn, f"echo send failed: {error}")
                return
        if conn.sock is not None:
            self._interest(conn)

    def _read(self, conn):
        try:
            data = conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._drop(conn, f"receive failed: {error}")
            return
        if not data:
            conn.eof = True
            if conn.record is not None:
                conn.record.eof = True
            return
        if conn.record is None:
            conn.head += data
            if len(conn.head) < len(MAGIC) + 4:
                return
            if not conn.head.startswith(MAGIC):
                self.errors.append(f"a connection began with {bytes(conn.head[:8])!r}, not a session header")
                self._drop(conn, None)
                return
            sid = int.from_bytes(conn.head[4:8], "big")
            conn.record = self.records.setdefault(sid, ServerRecord())
            conn.verifier = Verifier(sid)
            data, conn.head = bytes(conn.head), None
        conn.verifier.feed(data)
        conn.record.received += len(data)
        if conn.verifier.error and conn.record.error is None:
            conn.record.error = f"the echo server received a wrong stream: {conn.verifier.error}"
        conn.out += data

    def _interest(self, conn):
        if conn.eof and not conn.out:
            self._drop(conn, None)   # everything echoed: close, as the client expects
            return
        events = 0
        if not conn.eof and len(conn.out) < self.BACKLOG_LIMIT:
            events |= selectors.EVENT_READ
        if conn.out:
            events |= selectors.EVENT_WRITE
        if events != conn.events:
            self.selector.modify(conn.sock, events, conn)
            conn.events = events

    def _drop(self, conn, error):
        if error and conn.record is not None and conn.record.error is None:
            conn.record.error = error
        self.selector.unregister(conn.sock)
        conn.sock.close()
        conn.sock = None

    def stop(self):
        self.running = False
        self.join(5)


class _ServerConn:
    def __init__(self, sock):
        self.sock = sock
        self.head = bytearray()
        self.record = None
        self.verifier = None
        self.out = bytearray()
        self.eof = False
        self.events = 0


class UdpEcho(threading.Thread):
    """UDP echo; remembers from which gateway addresses each tag (the text
    before ':' in a datagram) arrived, to tell whether a flow kept its
    upstream socket across an upgrade."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.sock.settimeout(0.2)
        self.sources = {}   # tag -> list of (monotonic time, source address)
        self.running = True

    def run(self):
        while self.running:
            try:
                data, peer = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            tag = data.split(b":", 1)[0]
            self.sources.setdefault(tag, []).append((time.monotonic(), peer))
            try:
                self.sock.sendto(data, peer)
            except OSError:
                pass

    def stop(self):
        self.running = False
        self.join(5)


def echo_servers():
    """A TCP listener and a UDP socket on one port number (protocol = tcp+udp
    targets both at the same port)."""
    for _ in range(50):
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        except OSError:
            tcp.close()
            udp.close()
            continue
        tcp.listen(1024)
        return tcp, udp
    raise Fatal("no port free for both TCP and UDP echo")


def free_port():
    """A port number free for both TCP and UDP on 127.0.0.1 (the forward's listen port),
    below the ephemeral range, where no outgoing connection takes it meanwhile."""
    try:
        return testports.free_port()
    except RuntimeError as error:
        raise Fatal(str(error)) from error


# ---------------------------------------------------------------- the clients

class Session:
    """One client session through the gateway, driven by LoadDriver."""

    def __init__(self, sid, sock):
        self.id = sid
        self.sock = sock
        self.stream = SessionStream(sid)
        self.check = Verifier(sid)
        self.sizes = random.Random(sid)
        self.pending = bytearray()
        self.sent = 0           # bytes queued for sending (all are sent before the half-close)
        self.received = 0
        self.arrivals = []      # monotonic time of every echo chunk
        self.state = "streaming"   # -> finishing -> half-closed -> done | failed
        self.error = None
        self.events = 0

    def next_chunk(self):
        n = self.sizes.randint(CHUNK_MIN, CHUNK_MAX)
        if self.sent == 0:
            n += len(MAGIC) + 4
        data = self.stream.take(n)
        self.sent += len(data)
        return data


class LoadDriver(threading.Thread):
    """Drives every client session in one selector loop: sends each session a
    chunk every SEND_INTERVAL, reads and checks echoes, and on finish()
    half-closes once all is sent and reads to EOF. The main thread talks to
    it through a command queue (and a socketpair to wake it)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.commands = queue.Queue()
        self.due = []           # heap of (time, sid, session)
        self.crash = None
        self.running = True

    def open(self, port, sid):
        """Connects (blocking, from the calling thread) and hands the session to the loop."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        sock.setblocking(False)
        session = Session(sid, sock)
        self._command(("add", session))
        return session

    def finish(self, sessions):
        self._command(("finish", list(sessions)))

    def _command(self, command):
        self.commands.put(command)
        try:
            self.wake_w.send(b"!")
        except BlockingIOError:
            pass

    def run(self):
        try:
            while self.running:
                now = time.monotonic()
                self._send_due(now)
                timeout = 0.1 if not self.due else max(0.0, min(0.1, self.due[0][0] - now))
                for key, mask in self.selector.select(timeout):
                    if key.data is None:
                        self._commands()
                        continue
                    session = key.data
                    if mask & selectors.EVENT_WRITE:
                        self._flush(session)
                    if mask & selectors.EVENT_READ and session.state not in ("done", "failed"):
                        self._receive(session)
        except Exception:
            self.crash = traceback.format_exc()

    def _commands(self):
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while not self.commands.empty():
            verb, arg = self.commands.get()
            if verb == "add":
                arg.events = selectors.EVENT_READ
                self.selector.register(arg.sock, arg.events, arg)
                # Staggered starts: the sessions do not send in lockstep.
                heapq.heappush(self.due, (time.monotonic() + random.uniform(0, SEND_INTERVAL), arg.id, arg))
            elif verb == "finish":
                for session in arg:
                    if session.state == "streaming":
                        session.state = "finishing"
                        self._flush(session)

    def _send_due(self, now):
        while self.due and self.due[0][0] <= now:
            when, sid, session = heapq.heappop(self.due)
            if session.state != "streaming":
                continue
            session.pending += session.next_chunk()
            self._flush(session)
            # Keep the pace, but never burst to catch up after a stall.
            heapq.heappush(self.due, (max(when + SEND_INTERVAL, now), sid, session))

    def _flush(self, session):
        if session.state in ("done", "failed"):
            return
        while session.pending:
            try:
                sent = session.sock.send(session.pending)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                self._fail(session, f"send failed after {session.sent - len(session.pending)} bytes: {error}")
                return
            del session.pending[:sent]
        if session.state == "finishing" and not session.pending:
            try:
                session.sock.shutdown(socket.SHUT_WR)
            except OSError as error:
                self._fail(session, f"half-close failed: {error}")
                return
            session.state = "half-closed"
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if session.pending else 0)
        if events != session.events:
            self.selector.modify(session.sock, events, session)
            session.events = events

    def _receive(self, session):
        try:
            data = session.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._fail(session, f"receive failed after {session.received} bytes: {error}")
            return
        if not data:
            if session.state != "half-closed":
                self._fail(session, f"EOF before the client half-closed ({session.received} of {session.sent} bytes back)")
            elif session.received != session.sent:
                self._fail(session, f"EOF with {session.received} of {session.sent} bytes back")
            else:
                session.state = "done"
                self._close(session)
            return
        session.arrivals.append(time.monotonic())
        session.received += len(data)
        session.check.feed(data)
        if session.check.error:
            self._fail(session, f"the echo differs from what was sent: {session.check.error}")
        elif session.received > session.sent:
            self._fail(session, f"more bytes came back ({session.received}) than were sent ({session.sent})")

    def _fail(self, session, error):
        session.error = error
        session.state = "failed"
        self._close(session)

    def _close(self, session):
        try:
            self.selector.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        session.sock.close()

    def stop(self):
        self.running = False
        self._command(("stop", None))
        self.join(5)


class UdpFlow(threading.Thread):
    """One UDP client socket (one flow in the gateway) pinging every
    UDP_INTERVAL and recording which datagrams came back, and when."""

    def __init__(self, port, tag=b"flow"):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(UDP_INTERVAL)
        self.target = ("127.0.0.1", port)
        self.tag = tag
        self.sent = {}      # seq -> monotonic send time
        self.echoed = {}    # seq -> monotonic echo time
        self.running = True

    def run(self):
        seq = 0
        next_send = time.monotonic()
        while self.running:
            if time.monotonic() >= next_send:
                self.sent[seq] = time.monotonic()
                try:
                    self.sock.sendto(self.tag + b":%d" % seq, self.target)
                except OSError:
                    pass     # e.g. ECONNREFUSED from an ICMP error: a lost datagram
                seq += 1
                next_send += UDP_INTERVAL
            try:
                data, _ = self.sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            try:
                echoed = int(data.split(b":", 1)[1])
            except (IndexError, ValueError):
                continue
            self.echoed.setdefault(echoed, time.monotonic())

    def echoed_after(self, moment):
        """True when a datagram sent after `moment` came back."""
        return any(self.sent.get(seq, 0) > moment for seq in list(self.echoed))

    def lost_between(self, start, end):
        sent = [seq for seq, t in list(self.sent.items()) if start <= t <= end]
        return sum(1 for seq in sent if seq not in self.echoed), len(sent)

    def stop(self):
        self.running = False
        self.join(5)
        self.sock.close()


def tcp_probe(port, sid, size=65536):
    """A new connection: a session header and `size` stream bytes, half-close,
    read to EOF; True when exactly those bytes came back."""
    stream = SessionStream(sid)
    payload = stream.take(size + len(MAGIC) + 4)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
    except OSError as error:
        info(f"probe connection failed: {error}")
        return False
    return bytes(got) == payload


def udp_round_trip(port, tag):
    """A new UDP flow: one datagram echoed (a few tries: UDP may drop)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(1)
        for attempt in range(5):
            message = tag + b":%d" % attempt
            u.sendto(message, ("127.0.0.1", port))
            try:
                while True:
                    data, _ = u.recvfrom(2048)
                    if data == message:
                        return True
            except socket.timeout:
                continue
    return False


# ---------------------------------------------------------------- the gateway

READY = re.compile(r"ready:.*\bpid=(\d+)")
TOOK_OVER = re.compile(r"took over (\d+) connection")
HANDED_OVER = re.compile(r"handed over (\d+) connection")
UDP_FLOWS = re.compile(r"(\d+) UDP flow")
FROM_PID = re.compile(r"from pid[ =]?(\d+)")
TO_PID = re.compile(r"to pid[ =]?(\d+)")
UPGRADE_FAILED = re.compile(r"upgrade failed")


class GatewayLog:
    """Every line the gateway (and, through the inherited pipe, each process
    it upgrades into) writes to stdout/stderr."""

    def __init__(self, pipe, verbose):
        self.lines = []
        self.lock = threading.Lock()
        self.verbose = verbose
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe):
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self.lock:
                self.lines.append(line)
            if self.verbose:
                print(f"  | {line}", file=sys.stderr)

    def mark(self):
        with self.lock:
            return len(self.lines)

    def since(self, mark):
        with self.lock:
            return self.lines[mark:]

    def find(self, pattern, mark, accept=lambda m: True):
        for line in self.since(mark):
            m = pattern.search(line)
            if m and accept(m):
                return line, m
        return None

    def wait(self, pattern, mark, what, accept=lambda m: True, give_up=lambda: None):
        """The first line after `mark` matching `pattern` (and `accept`);
        Fatal after the deadline or as soon as give_up() returns a reason."""
        end = time.monotonic() + DEADLINE
        while True:
            found = self.find(pattern, mark, accept)
            if found:
                return found
            reason = give_up()
            if reason or time.monotonic() > end:
                fail(f"{what}: not logged ({reason or f'{DEADLINE:.0f} s deadline'})")
                raise Fatal(what)
            time.sleep(0.02)

    def dump(self, last=400):
        with self.lock:
            lines = self.lines[-last:]
        print(f"[{NAME}] gateway log (last {len(lines)} lines):", file=sys.stderr)
        for line in lines:
            print(f"  | {line}", file=sys.stderr)


def become_subreaper():
    """Orphaned descendants (an upgraded gateway whose parent exited) become
    this process's children: their exit status can be read and they are
    never left as zombies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0   # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def proc_stat(pid):
    """(state, ppid) from /proc/PID/stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def zombie_children(pid):
    zombies = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat and stat[1] == pid and stat[0] == "Z":
                zombies.append(int(entry))
    return zombies


class Gateway:
    """The gateway under test: PATH (replaced at each upgrade), its config,
    and the pid serving now."""

    def __init__(self, work, binary, verbose):
        self.work = work
        # Every fresh copy comes from one snapshot of BIN: a rebuild during
        # the run cannot mix two builds (or copy a half-written file).
        self.binary = os.path.join(work, "snapshot-of-BIN")
        shutil.copyfile(binary, self.binary)
        self.verbose = verbose
        self.path = os.path.join(work, "leostream-gateway")
        self.config = os.path.join(work, "gateway.conf")
        self.state = os.path.join(work, "state")
        self.argv = [self.path, "serve", "--config", self.config, "--state-dir", self.state]
        self.proc = None
        self.log = None
        self.pid = None
        self.pids = []          # every gateway pid seen, for the cleanup
        self.exits = {}         # pid -> ("exited", code) | ("signal", number) | ("gone", None)

    def install(self, source=None, text=None, mode=0o755):
        """Puts a new file at PATH (a new inode, renamed over the old: the
        running binary is never written to). Returns its inode."""
        staging = self.path + ".new"
        if text is not None:
            with open(staging, "w") as f:
                f.write(text)
        else:
            shutil.copyfile(source or self.binary, staging)
        os.chmod(staging, mode)
        os.replace(staging, self.path)
        return os.stat(self.path).st_ino

    def write_config(self, text):
        staging = self.config + ".new"
        with open(staging, "w") as f:
            f.write(text)
        os.replace(staging, self.config)

    def start(self):
        env = dict(os.environ)
        for key in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(key, None)   # log to stderr, no service manager
        mark = 0
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self.pids.append(self.pid)
        self.log = GatewayLog(self.proc.stdout, self.verbose)
        self.log.wait(READY, mark, f"the gateway's `ready: ... pid={self.pid}` line",
                      accept=lambda m: int(m.group(1)) == self.pid, give_up=lambda: self.dead_reason(self.pid))

    def exit_status(self, pid):
        """None while `pid` runs; else how it ended (exit code or signal when
        it was this process's child, as every gateway is thanks to the subreaper)."""
        if pid in self.exits:
            return self.exits[pid]
        status = None
        if self.proc is not None and pid == self.proc.pid:
            code = self.proc.poll()
            if code is not None:
                status = ("exited", code) if code >= 0 else ("signal", -code)
        else:
            try:
                reaped, raw = os.waitpid(pid, os.WNOHANG)
                if reaped == pid:
                    status = (("exited", os.WEXITSTATUS(raw)) if os.WIFEXITED(raw)
                              else ("signal", os.WTERMSIG(raw)))
            except ChildProcessError:     # not (yet) our child: look at /proc
                stat = proc_stat(pid)
                if stat is None or stat[0] in ("Z", "X"):
                    status = ("gone", None)
        if status is not None:
            self.exits[pid] = status
        return status

    def alive(self, pid):
        return self.exit_status(pid) is None

    def dead_reason(self, pid):
        status = self.exit_status(pid)
        return None if status is None else f"pid {pid} ended: {describe(status)}"

    def wait_exit(self, pid):
        eventually(lambda: not self.alive(pid))
        return self.exit_status(pid)

    def running_file(self, pid):
        """The inode of the file `pid` executes (st_ino of /proc/PID/exe)."""
        try:
            return os.stat(f"/proc/{pid}/exe").st_ino
        except OSError:
            return None

    def interpreted(self):
        with open(self.path, "rb") as f:
            return f.read(2) == b"#!"

    def cmdline(self, pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return [a.decode() for a in f.read().split(b"\0") if a]
        except OSError:
            return None

    def kill_all(self):
        """Cleanup: SIGTERM then SIGKILL every gateway pid still running, and
        reap whatever became this process's child."""
        live = [pid for pid in self.pids if self.alive(pid)]
        for pid in live:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        end = time.monotonic() + 10
        while time.monotonic() < end and any(self.alive(pid) for pid in live):
            time.sleep(0.05)
        for pid in live:
            if self.alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        eventually(lambda: not any(self.alive(pid) for pid in live), 10)
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass


def describe(status):
    kind, value = status
    if kind == "exited":
        return f"exit status {value}"
    if kind == "signal":
        try:
            return f"killed by {signal.Signals(value).name}"
        except ValueError:
            return f"killed by signal {value}"
    return "gone (not this process's child: status unknown)"


def scrape(port):
    """/metrics as {name: sum of every sample of that name}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                values[name] = values.get(name, 0) + float(value)
            except ValueError:
                pass
    return values


def gauge(port, name):
    try:
        return int(scrape(port).get(name, -1))
    except OSError:
        return None


# ---------------------------------------------------------------- the test

class HotUpgradeTest:
    def __init__(self, binary, verbose, harness_only):
        self.work = tempfile.mkdtemp(prefix="hot-upgrade.")
        try:
            self.gateway = Gateway(self.work, binary, verbose)
            self.harness_only = harness_only
            self.next_sid = 1
            self.totals = {"sessions": 0, "client_sent": 0, "client_received": 0, "server_received": 0}
            tcp, udp = echo_servers()
            self.echo_port = tcp.getsockname()[1]
            self.echo = EchoServer(tcp)
            self.udp_echo = UdpEcho(udp)
            self.driver = LoadDriver()
            self.port = free_port()
            self.metrics = free_port()
        except BaseException:
            shutil.rmtree(self.work, ignore_errors=True)
            raise

    def sid(self):
        self.next_sid += 1
        return self.next_sid - 1

    def config_text(self):
        return f"""# hot-upgrade.py: one forward, TCP and UDP, to the test's echo servers
loops = 2
log_level = info
metrics_listen = 127.0.0.1:{self.metrics}
drain_timeout = 5s
connect_timeout = 5s

[forward echo]
listen = 127.0.0.1:{self.port}
target = 127.0.0.1:{self.echo_port}
protocol = tcp+udp
"""

    def run(self):
        for thread in (self.echo, self.udp_echo, self.driver):
            thread.start()
        self.start()
        self.upgrade_under_load(100)
        if self.harness_only:
            info("harness-only: no failed upgrades tried (they need SIGUSR2)")
        else:
            self.failed_upgrades(10)
        self.upgrade_under_load(20, kept_flow=False, label="second upgrade")
        self.stop()

    # ------------------------------------------------------------ steps

    def start(self):
        self.gateway.install()
        self.gateway.write_config(self.config_text())
        checked = subprocess.run([self.gateway.path, "--check", "--config", self.gateway.config],
                                 capture_output=True, text=True, timeout=DEADLINE)
        require(checked.returncode == 0, f"--check accepts the test's config (protocol = tcp+udp): "
                                         f"{(checked.stdout + checked.stderr).strip()!r}")
        self.gateway.start()
        ok(f"the gateway started and logged ready with pid={self.gateway.pid}")
        require(tcp_probe(self.port, self.sid()), "a TCP connection through the forward echoes 64 KiB")
        require(udp_round_trip(self.port, b"before"), "a UDP datagram through the forward is echoed")

    def require_serving(self, label):
        """A phase starts only on a running gateway (a dead one would only
        turn every later step into a connection error)."""
        reason = self.gateway.dead_reason(self.gateway.pid)
        require(reason is None, f"{label}: the gateway still runs" + (f" ({reason})" if reason else ""))

    def open_sessions(self, count):
        try:
            sessions = [self.driver.open(self.port, self.sid()) for _ in range(count)]
        except OSError as error:
            require(False, f"{count} sessions open through the gateway ({error})")
        moved = eventually(lambda: all(s.received >= MOVED_BEFORE_UPGRADE or s.state == "failed" for s in sessions))
        require(moved and not any(s.state == "failed" for s in sessions),
                f"{count} sessions opened and each echoed {MOVED_BEFORE_UPGRADE} bytes or more"
                + self.session_errors(sessions))
        require(eventually(lambda: gauge(self.metrics, "relay_connections_active") == count),
                f"/metrics: relay_connections_active is {count} ({gauge(self.metrics, 'relay_connections_active')})")
        return sessions

    def upgrade_under_load(self, count, kept_flow=True, label="upgrade"):
        self.require_serving(label)
        info(f"{label}: {count} sessions streaming")
        sessions = self.open_sessions(count)
        flow = None
        if kept_flow:
            flow = UdpFlow(self.port)
            flow.start()
            require(eventually(lambda: len(flow.echoed) >= 5), "a UDP flow kept open echoes before the upgrade")
        time.sleep(1.0)   # pacing: a second of steady streaming, the baseline for the gap figure
        timing = self.upgrade(count, label)
        time.sleep(2.0)   # pacing: the sessions keep streaming through the new process
        self.after_upgrade(count, flow, timing, label)
        self.finish(sessions, f"{label}: sessions streaming across it")
        self.report_gaps(sessions, timing, label)
        if flow:
            lost, sent = flow.lost_between(timing["signal"], timing["done"])
            info(f"{label}: the kept UDP flow lost {lost} of {sent} datagrams sent during the upgrade (informational)")
            flow.stop()

    def upgrade(self, count, label):
        """Replaces PATH, sends SIGUSR2 and checks the handover; returns
        monotonic times: signal, took (took-over line seen), done (old gone)."""
        gw = self.gateway
        old = gw.pid
        inode = gw.install()
        # Read just before the signal: no UDP flow starts or ends between the two.
        udp_flows = max(0, gauge(self.metrics, "relay_udp_flows_active") or 0)
        mark = gw.log.mark()
        timing = {"signal": time.monotonic()}
        if self.harness_only:
            time.sleep(0.5)
            timing["took"] = timing["done"] = time.monotonic()
            return timing
        os.kill(old, signal.SIGUSR2)

        def old_failed():
            status = gw.exit_status(old)
            return None if status is None or status == ("exited", 0) else f"the old gateway ended first: {describe(status)}"

        def upgrade_failed():
            found = gw.log.find(UPGRADE_FAILED, mark)
            return f"the gateway logged: {found[0]}" if found else old_failed()

        line, took = gw.log.wait(TOOK_OVER, mark, f"{label}: the new process's `took over N connection(s)`", give_up=upgrade_failed)
        timing["took"] = time.monotonic()
        _, ready = gw.log.wait(READY, mark, f"{label}: the new process's `ready: ... pid=` line",
                               accept=lambda m: int(m.group(1)) != old, give_up=upgrade_failed)
        new = int(ready.group(1))
        gw.pids.append(new)
        handed_line, handed = gw.log.wait(HANDED_OVER, mark, f"{label}: the old process's `handed over N connection(s)`",
                                          give_up=upgrade_failed)
        status = gw.wait_exit(old)
        timing["done"] = time.monotonic()
        require(status == ("exited", 0), f"{label}: the old gateway (pid {old}) exited with status 0 ({describe(status) if status else 'still running'})")
        gw.pid = new
        took_n, handed_n = int(took.group(1)), int(handed.group(1))
        flows = UDP_FLOWS.search(line)
        if flows:
            # UDP flows counted on their own: connections are exactly our sessions,
            # flows exactly what /metrics counted just before the signal.
            check(took_n == count, f"{label}: took over {took_n} connection(s), the {count} sessions: {line!r}")
            check(int(flows.group(1)) == udp_flows,
                  f"{label}: took over {flows.group(1)} UDP flow(s), the {udp_flows} /metrics counted before the signal")
        else:
            # Only our sessions are open; if the gateway counts UDP flows as
            # connections, the count may include those /metrics reported.
            check(count <= took_n <= count + udp_flows,
                  f"{label}: took over {took_n} connection(s): the {count} sessions"
                  + (f" (+ up to {udp_flows} UDP flow(s))" if udp_flows else "") + f": {line!r}")
        check(handed_n == took_n, f"{label}: the old process handed over as many ({handed_n}): {handed_line!r}")
        from_pid, to_pid = FROM_PID.search(line), TO_PID.search(handed_line)
        check(from_pid is not None and int(from_pid.group(1)) == old, f"{label}: `took over` names the old pid {old}")
        check(to_pid is not None and int(to_pid.group(1)) == new, f"{label}: `handed over` names the new pid {new}")
        check(new != old and gw.alive(new), f"{label}: the new gateway (pid {new}, was {old}) is running")
        cmdline = gw.cmdline(new)
        if gw.interpreted():
            # A script at PATH (a stand-in gateway): /proc/PID/exe is its
            # interpreter, and the interpreter leads the command line.
            check(cmdline is not None and cmdline[-len(gw.argv):] == gw.argv,
                  f"{label}: the new gateway runs PATH (a script) with the same arguments ({cmdline})")
        else:
            check(gw.running_file(new) == inode, f"{label}: the new gateway runs the file now at PATH (inode {inode})")
            check(cmdline == gw.argv, f"{label}: the new gateway has the same arguments ({cmdline})")
        check(gw.log.find(UPGRADE_FAILED, mark) is None, f"{label}: no `upgrade failed` logged")
        timing["udp_flows"] = int(flows.group(1)) if flows else None
        return timing

    def after_upgrade(self, count, flow, timing, label):
        port = self.port
        check(tcp_probe(port, self.sid()), f"{label}: a new TCP connection afterwards echoes 64 KiB")
        check(udp_round_trip(port, b"after"), f"{label}: a new UDP flow afterwards echoes")
        if flow:
            check(eventually(lambda: flow.echoed_after(timing["done"])),
                  f"{label}: the UDP flow kept open across the upgrade still echoes")
            # A flow handed over keeps its upstream socket: the desktop sees one
            # source address. A second one means a new flow was made for the
            # same client (a datagram met no flow during the handover).
            seen = {}
            for t, peer in list(self.udp_echo.sources.get(b"flow", [])):
                seen.setdefault(peer, []).append(t - timing["signal"])
            check(len(seen) == 1, f"{label}: the kept UDP flow reached the desktop from one upstream address throughout ("
                  + "; ".join(f"{peer[0]}:{peer[1]} from {min(ts) * 1000:+.0f} to {max(ts) * 1000:+.0f} ms after SIGUSR2, {len(ts)} datagrams"
                              for peer, ts in seen.items()) + ")")
        active = lambda: gauge(self.metrics, "relay_connections_active")
        check(eventually(lambda: active() == count),
              f"{label}: /metrics of the new process counts the {count} sessions (relay_connections_active {active()})")
        if timing.get("udp_flows") is not None:
            # Every flow taken over, plus the one the new-flow probe above added.
            flows = lambda: gauge(self.metrics, "relay_udp_flows_active")
            check(eventually(lambda: flows() == timing["udp_flows"] + 1),
                  f"{label}: /metrics of the new process counts the {timing['udp_flows']} UDP flows taken over "
                  f"and the new one (relay_udp_flows_active {flows()})")

    def failed_upgrades(self, count):
        """Each way an upgrade can fail leaves the gateway as it was."""
        label = "failed upgrade"
        info(f"{label}: {count} sessions streaming")
        gw = self.gateway
        self.require_serving(label)
        sessions = self.open_sessions(count)
        good_config = self.config_text()
        cases = [
            ("the new binary exits 1 at once", lambda: gw.install(text="#!/bin/sh\nexit 1\n", mode=0o755)),
            ("the new binary is not executable", lambda: gw.install(text="#!/bin/sh\nexit 0\n", mode=0o644)),
            ("the config no longer loads", lambda: (gw.install(),
                                                     gw.write_config(good_config + "\nthis line is not a setting\n"))),
        ]
        for what, prepare in cases:
            pid = gw.pid
            prepare()
            mark = gw.log.mark()
            os.kill(pid, signal.SIGUSR2)
            line, _ = gw.log.wait(UPGRADE_FAILED, mark, f"{label} ({what}): `upgrade failed`",
                                  give_up=lambda: gw.dead_reason(pid))
            ok(f"{label} ({what}): logged {line!r}")
            check(gw.alive(pid), f"{label} ({what}): the gateway (pid {pid}) still runs")
            others = gw.log.find(READY, mark, accept=lambda m: int(m.group(1)) != pid)
            check(others is None, f"{label} ({what}): no other process became ready ({others and others[0]!r})")
            check(gw.log.find(TOOK_OVER, mark) is None and gw.log.find(HANDED_OVER, mark) is None,
                  f"{label} ({what}): nothing was handed over")
            check(eventually(lambda: not zombie_children(pid)),
                  f"{label} ({what}): the failed new process was reaped (zombies: {zombie_children(pid)})")
            check(tcp_probe(self.port, self.sid()), f"{label} ({what}): a new TCP connection still echoes")
            check(udp_round_trip(self.port, b"failed"), f"{label} ({what}): a new UDP flow still echoes")
        gw.write_config(good_config)
        gw.install()
        time.sleep(1.0)   # pacing: the sessions keep streaming after the last failure
        self.finish(sessions, f"{label}: sessions streaming across three failed upgrades")

    def stop(self):
        gw = self.gateway
        pid = gw.pid
        self.require_serving("stop")
        os.kill(pid, signal.SIGTERM)
        status = gw.wait_exit(pid)
        if status and status[0] == "gone":
            check(True, f"after SIGTERM the gateway (pid {pid}) is gone (exit status unknown: subreaper unavailable)")
        else:
            check(status == ("exited", 0), f"after SIGTERM the gateway (pid {pid}) exits 0 ({describe(status) if status else 'still running'})")

    # ------------------------------------------------------------ verification

    def session_errors(self, sessions, limit=5):
        bad = [s for s in sessions if s.error]
        if not bad:
            return ""
        return f" ({len(bad)} failed; first: " + "; ".join(f"session {s.id}: {s.error}" for s in bad[:limit]) + ")"

    def finish(self, sessions, what):
        """Half-closes every session once its last chunk is sent and checks
        that each got back exactly what it sent, and that the echo server
        received exactly that too."""
        self.driver.finish(sessions)
        eventually(lambda: all(s.state in ("done", "failed") for s in sessions))
        pending = [s for s in sessions if s.state not in ("done", "failed")]
        problems = [f"session {s.id}: {s.error}" for s in sessions if s.state == "failed"]
        problems += [f"session {s.id}: no EOF after the half-close ({s.received} of {s.sent} bytes back)" for s in pending]
        for s in sessions:
            record = self.echo.records.get(s.id)
            if record is None:
                problems.append(f"session {s.id}: never reached the echo server")
            elif record.error:
                problems.append(f"session {s.id}: {record.error}")
            elif record.received != s.sent or not record.eof:
                problems.append(f"session {s.id}: the echo server got {record.received} of {s.sent} bytes"
                                f"{'' if record.eof else ' and no half-close'}")
        sent = sum(s.sent for s in sessions)
        received = sum(s.received for s in sessions)
        server = sum(r.received for r in (self.echo.records.get(s.id) for s in sessions) if r)
        check(not problems, f"{what}: all {len(sessions)} sessions got back every byte they sent, in order, then EOF "
                            f"({sent} bytes sent, {received} echoed)"
                            + (f": {len(problems)} problem(s): " + "; ".join(problems[:8]) if problems else ""))
        self.totals["sessions"] += len(sessions)
        self.totals["client_sent"] += sent
        self.totals["client_received"] += received
        self.totals["server_received"] += server

    def report_gaps(self, sessions, timing, label):
        """Informational: the longest wait between two echo chunks that
        overlaps the upgrade, against the same figure in the second before it."""
        start, end = timing["signal"], timing["done"]
        around = max(((longest_gap(s.arrivals, start, end), s.id) for s in sessions), default=(0, 0))
        baseline = max((longest_gap(s.arrivals, start - 1.0, start - 0.05) for s in sessions), default=0)
        info(f"{label}: longest gap between echo chunks around the upgrade {around[0] * 1000:.0f} ms (session {around[1]}); "
             f"in the second before it {baseline * 1000:.0f} ms; SIGUSR2 to `took over` "
             f"{(timing['took'] - start) * 1000:.0f} ms, to the old process's exit {(end - start) * 1000:.0f} ms (informational)")

    def report(self):
        t = self.totals
        info(f"totals: {t['sessions']} streaming sessions; client -> gateway -> echo server {t['client_sent']} bytes sent, "
             f"{t['server_received']} received; echo -> client {t['client_received']} bytes")

    def background_errors(self):
        for name, thread in (("load driver", self.driver), ("echo server", self.echo)):
            check(thread.crash is None, f"the test's {name} ran without an exception" + (f":\n{thread.crash}" if thread.crash else ""))
        check(not self.echo.errors, f"every connection to the echo server was a test session ({self.echo.errors[:3]})")

    def cleanup(self):
        try:
            self.gateway.kill_all()
        finally:
            self.driver.stop()
            self.echo.stop()
            self.udp_echo.stop()
            shutil.rmtree(self.work, ignore_errors=True)


def longest_gap(times, start, end):
    """The longest interval between consecutive arrivals that overlaps [start, end]."""
    longest = 0.0
    for a, b in zip(times, times[1:]):
        if b >= start and a <= end:
            longest = max(longest, b - a)
    return longest


def main():
    parser = argparse.ArgumentParser(description="End-to-end test of the gateway's hot upgrade (SIGUSR2).",
                                     epilog=f"Deadline per wait: RDG_TEST_DEADLINE (now {DEADLINE:.0f} s).")
    parser.add_argument("binary", metavar="BIN", help="the leostream-gateway binary")
    parser.add_argument("--verbose", action="store_true", help="echo the gateway's log as it comes")
    parser.add_argument("--harness-only", action="store_true",
                        help="send no SIGUSR2 (checks the test's traffic and byte checks on a gateway without hot upgrade)")
    args = parser.parse_args()
    binary = os.path.abspath(args.binary)
    if not os.access(binary, os.X_OK):
        print(f"[{NAME}] FAIL: {binary} is not an executable file", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout) unwinds like an error: the finally below stops the gateways.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not become_subreaper():
        info("warning: PR_SET_CHILD_SUBREAPER unavailable: exit statuses after the first upgrade cannot be read")
    started = time.monotonic()
    test = None
    try:
        test = HotUpgradeTest(binary, args.verbose, args.harness_only)
        test.run()
    except Fatal:
        pass   # already reported by require()/wait()
    except Exception:
        fail(f"the test itself raised:\n{traceback.format_exc()}")
    finally:
        if test is not None:
            # Processes first: printing can fail (a closed pipe) and must not leave a gateway behind.
            try:
                test.cleanup()
            finally:
                test.background_errors()
                if failures and test.gateway.log and not args.verbose:
                    test.gateway.log.dump()
                test.report()
    info(f"{passed} passed, {len(failures)} failed in {time.monotonic() - started:.1f} s"
         + (" (harness only: no upgrade tried)" if args.harness_only else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
