#!/usr/bin/python3
"""End-to-end test of the daemons' operations side (issue 13): the systemd
notify protocol, the journal, and Prometheus metrics, against the real
binaries.

systemd is not PID 1 on the test machines, so the test plays the service
manager itself: it binds a datagram socket and passes it as NOTIFY_SOCKET
(with WATCHDOG_USEC), exactly what systemd gives a Type=notify service; the
daemon's libsystemd sd_notify() writes to it. For the journal, the gateway
runs in a private mount namespace where the test's own datagram socket sits
at /run/systemd/journal/socket (where sd_journal_sendv() writes) and
JOURNAL_STREAM names the daemon's stderr, as systemd sets it.

Checks:
  gateway   READY=1 only once the forward's listener accepts; STATUS= with
            sessions; WATCHDOG=1 repeatedly; /metrics (metrics_listen)
            parsed by prometheus_client with bytes and datagrams equal to what
            the test sent; SIGHUP -> RELOADING=1 then READY=1; SIGTERM ->
            STOPPING=1 and exit 0; SIGUSR2 (hot upgrade) -> MAINPID= of the
            successor, BARRIER=1, exit 0; the successor's READY=1 after it, its
            watchdog pings, the live session carried on; --version names the commit
  activation  a forward on a listening socket passed as LISTEN_FDS (bound
            without SO_REUSEPORT: the gateway could not bind it itself); a
            client queued in its backlog before the start is relayed
  journal   the gateway's events arrive as journal entries with MESSAGE,
            PRIORITY, SYSLOG_IDENTIFIER, RULE_ID, TARGET fields; nothing on stderr
  broker    READY=1 after the listener; WATCHDOG=1; /metrics parsed, with
            the login request counted by route and status; STOPPING=1
  Security Gateway  READY=1, WATCHDOG=1; a prepared grant and a non-TLS
            client counted in /metrics; RELOADING=1/READY=1; STOPPING=1
  --version of all five binaries names the git commit
Usage: Tests/e2e/service-ops.py BIN_DIR      (root; exit 0 when all passed)
Every wait polls up to a generous deadline (RDG_TEST_DEADLINE, default 60 s).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from testports import free_port  # free for TCP and UDP, below the ephemeral range

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    print("[service-ops] FAIL: python3-prometheus-client is not installed (scripts/install-deps test installs it)", file=sys.stderr)
    sys.exit(1)

DEADLINE = float(os.environ.get("RDG_TEST_DEADLINE", "60"))
NAME = "service-ops"
failures = []
passed = 0


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


def eventually(condition, seconds=DEADLINE):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class NotifySocket:
    """The service manager's end of sd_notify: collects every message."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages = []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while self.running:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append(data.decode(errors="replace"))

    def all(self):
        with self.lock:
            return list(self.messages)

    def count(self, prefix):
        return sum(1 for m in self.all() if m.startswith(prefix) or ("\n" + prefix) in m)

    def index_of(self, prefix, after=-1):
        for i, m in enumerate(self.all()):
            if i > after and (m.startswith(prefix) or ("\n" + prefix) in m):
                return i
        return None

    def close(self):
        self.running = False
        self.sock.close()


class EchoServer:
    """TCP and UDP echo on 127.0.0.1 (the desktop)."""

    def __init__(self):
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(16)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        threading.Thread(target=self._tcp, daemon=True).start()
        threading.Thread(target=self._udp, daemon=True).start()

    def _tcp(self):
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn):
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def _udp(self):
        while True:
            try:
                data, peer = self.udp.recvfrom(65536)
            except OSError:
                return
            self.udp.sendto(data, peer)


def scrape(url):
    with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
        content_type = answer.headers.get("Content-Type", "")
        text = answer.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return content_type, families, text


def sample(families, family, name, **labels):
    f = families.get(family)
    if f is None:
        return None
    for s in f.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def tcp_round_trip(port, payload):
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_daemon(work, name, argv):
    """Starts a daemon as systemd starts a Type=notify service with a
    watchdog: NOTIFY_SOCKET (the test's socket) and WATCHDOG_USEC (1 s)."""
    notify = NotifySocket(os.path.join(work, f"notify-{name}"))
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
    env.pop("JOURNAL_STREAM", None)
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, notify, log


def sigterm_stops(proc, notify, name):
    os.kill(proc.pid, signal.SIGTERM)
    check(eventually(lambda: notify.count("STOPPING=1") >= 1), f"{name}: SIGTERM -> STOPPING=1")
    try:
        code = proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        code = None
    check(code == 0, f"{name} exited 0 after SIGTERM ({code})")


def finish_daemon(proc, notify, log, work, name):
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    notify.close()
    log.close()
    if failures:
        print(open(os.path.join(work, f"{name}.log")).read()[-4000:], file=sys.stderr)


def gateway_config(directory, forward_port, udp_port, metrics_port, echo):
    path = os.path.join(directory, "gateway.conf")
    with open(path, "w") as f:
        f.write(f"""log_level = info
metrics_listen = 127.0.0.1:{metrics_port}
drain_timeout = 5s

[forward desk]
listen = 127.0.0.1:{forward_port}
target = 127.0.0.1:{echo.tcp.getsockname()[1]}
allow = 127.0.0.0/8

[forward deskudp]
listen = 127.0.0.1:{udp_port}
target = 127.0.0.1:{echo.udp.getsockname()[1]}
protocol = udp
allow = 127.0.0.0/8
""")
    return path


def test_gateway(bin_dir, work):
    gateway = os.path.join(bin_dir, "leostream-gateway")
    version = subprocess.run([gateway, "--version"], capture_output=True, text=True)
    check(version.returncode == 0 and "(commit " in version.stdout, f"leostream-gateway --version names the commit: {version.stdout.strip()!r}")

    echo = EchoServer()
    forward, udp_port, metrics = free_port(), free_port(), free_port()
    config = gateway_config(work, forward, udp_port, metrics, echo)
    proc, notify, log = start_daemon(work, "gateway", [gateway, "serve", "--config", config, "--state-dir", os.path.join(work, "state")])
    try:
        if not check(eventually(lambda: notify.count("READY=1") >= 1 or proc.poll() is not None) and proc.poll() is None,
                     "gateway sent READY=1"):
            return
        # READY=1 means the listeners are open: the forward accepts at once.
        check(accepts(forward), "the forward accepts as soon as READY=1 arrived")
        first = notify.all()[notify.index_of("READY=1")]
        check("STATUS=" in first and "session" in first, f"READY=1 carries a STATUS= line: {first!r}")
        check(eventually(lambda: notify.count("WATCHDOG=1") >= 3), "WATCHDOG=1 pings keep coming (WATCHDOG_USEC=1 s)")

        payload = os.urandom(100_000)
        check(tcp_round_trip(forward, payload) == payload, "100,000 bytes relayed through the forward and echoed")
        datagrams = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            for i in range(5):
                u.sendto(b"x" * 100, ("127.0.0.1", udp_port))
                try:
                    u.recvfrom(2048)
                    datagrams += 1
                except socket.timeout:
                    pass
        check(datagrams == 5, f"5 datagrams echoed through the UDP forward ({datagrams})")

        def bytes_match():
            _, fam, _ = scrape(f"http://127.0.0.1:{metrics}/metrics")
            return (sample(fam, "relay_rule_bytes", "relay_rule_bytes_total", rule="desk", direction="to_target") == 100_000
                    and sample(fam, "relay_rule_bytes", "relay_rule_bytes_total", rule="desk", direction="to_client") == 100_000)
        check(eventually(bytes_match), "/metrics: relay_rule_bytes_total{rule=desk} is 100000 each way")
        content_type, families, text = scrape(f"http://127.0.0.1:{metrics}/metrics")
        check(content_type.startswith("text/plain; version=0.0.4"), f"/metrics content type {content_type!r}")
        # Two connections: the readiness probe (accepts) and the 100,000-byte one.
        check(sample(families, "relay_connections_accepted", "relay_connections_accepted_total") == 2,
              "/metrics: relay_connections_accepted_total is 2")
        check(sample(families, "relay_rule_connections_accepted", "relay_rule_connections_accepted_total", rule="desk") == 2,
              "/metrics: relay_rule_connections_accepted_total{rule=desk} is 2")
        check(sample(families, "relay_udp_datagrams", "relay_udp_datagrams_total", rule="deskudp", direction="to_target") == 5
              and sample(families, "relay_udp_datagrams", "relay_udp_datagrams_total", rule="deskudp", direction="to_client") == 5,
              "/metrics: relay_udp_datagrams_total{rule=deskudp} is 5 each way")
        check(sample(families, "relay_udp_bytes", "relay_udp_bytes_total", rule="deskudp", direction="to_target") == 500,
              "/metrics: relay_udp_bytes_total{rule=deskudp,direction=to_target} is 500")
        check(sample(families, "relay_admission_limit", "relay_admission_limit", kind="connections") is not None,
              "/metrics: admission limits present")
        check(sample(families, "relay_udp_drops", "relay_udp_drops_total", rule="deskudp", reason="flow_limit") == 0,
              "/metrics: UDP drops by reason present (0)")
        # A refused client is counted by reason.
        check(families.get("relay_connections_refused") is not None, "/metrics: refusals by reason present")

        before = len(notify.all())
        os.kill(proc.pid, signal.SIGHUP)
        reloading = lambda: notify.index_of("RELOADING=1", after=before - 1)
        check(eventually(lambda: reloading() is not None), "SIGHUP -> RELOADING=1")
        check(eventually(lambda: reloading() is not None and notify.index_of("READY=1", after=reloading()) is not None),
              "... then READY=1 once reloaded")
        reload_message = notify.all()[reloading()]
        check("MONOTONIC_USEC=" in reload_message, "RELOADING=1 carries MONOTONIC_USEC")

        # Hot upgrade (SIGUSR2): the running process names its successor with
        # MAINPID= and waits (BARRIER=1) until the manager has read it before
        # it exits; the successor says READY=1 only after that, and pings.
        before = len(notify.all())
        session = socket.create_connection(("127.0.0.1", forward), timeout=DEADLINE)
        session.sendall(b"before the upgrade")
        check(session.recv(100) == b"before the upgrade", "a session is live before the upgrade")
        os.kill(proc.pid, signal.SIGUSR2)
        main_pid = lambda: notify.index_of("MAINPID=", after=before - 1)
        if check(eventually(lambda: main_pid() is not None), "SIGUSR2 -> MAINPID= of the successor"):
            message = notify.all()[main_pid()]
            successor = int(message.split("MAINPID=")[1].split("\n")[0])
            check(successor != proc.pid, f"MAINPID={successor} names another process than {proc.pid}")
            check(eventually(lambda: notify.index_of("BARRIER=1", after=main_pid()) is not None),
                  "... then BARRIER=1 (it waits for the manager before exiting)")
            try:
                code = proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                code = None
            check(code == 0, f"the predecessor exited 0 after the handover ({code})")
            check(eventually(lambda: notify.index_of("READY=1", after=main_pid()) is not None),
                  "the successor sent READY=1 after the predecessor's MAINPID=")
            watchdog_seen = len(notify.all())
            check(eventually(lambda: notify.index_of("WATCHDOG=1", after=watchdog_seen - 1) is not None),
                  "the successor pings the watchdog")
            session.sendall(b"after the upgrade")
            check(session.recv(100) == b"after the upgrade", "the live session carries on through the successor")
            session.close()
            check(tcp_round_trip(forward, payload) == payload, "a new connection through the successor echoes 100,000 bytes")
            stopping = len(notify.all())
            os.kill(successor, signal.SIGTERM)
            check(eventually(lambda: notify.index_of("STOPPING=1", after=stopping - 1) is not None), "successor: SIGTERM -> STOPPING=1")
            check(eventually(lambda: not os.path.exists(f"/proc/{successor}")), "the successor exited after SIGTERM")
        else:
            sigterm_stops(proc, notify, "gateway")
    finally:
        finish_daemon(proc, notify, log, work, "gateway")


def journal_child(bin_dir, work, result_path):
    """Runs inside `unshare --mount`: /run is a private tmpfs holding the
    test's journal socket."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    os.makedirs("/run/systemd/journal", exist_ok=True)
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind("/run/systemd/journal/socket")
    journal.settimeout(0.2)
    entries = []

    def read():
        while True:
            try:
                data = journal.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            entries.append(parse_journal(data))

    threading.Thread(target=read, daemon=True).start()
    echo = EchoServer()
    forward, udp_port, metrics = free_port(), free_port(), free_port()
    config = gateway_config(work, forward, udp_port, metrics, echo)
    closed = free_port()
    with open(config, "a") as f:   # a forward this client may not use: its refusal is an event with fields
        f.write(f"\n[forward closed]\nlisten = 127.0.0.1:{closed}\ntarget = 127.0.0.1:{echo.tcp.getsockname()[1]}\nallow = 192.0.2.0/24\n")
    stderr_path = os.path.join(work, "journal-stderr.log")
    stderr = open(stderr_path, "w")
    info = os.fstat(stderr.fileno())
    env = dict(os.environ, JOURNAL_STREAM=f"{info.st_dev}:{info.st_ino}")
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([os.path.join(bin_dir, "leostream-gateway"), "serve", "--config", config,
                             "--state-dir", os.path.join(work, "state-journal")], env=env, stdout=stderr, stderr=stderr)
    found = eventually(lambda: any(e.get("MESSAGE", "").startswith("ready:") for e in entries)
                       and any(e.get("RULE_ID") == "desk" for e in entries))
    if found and eventually(lambda: accepts(closed)):
        eventually(lambda: any(e.get("REASON") == "not_allowed" for e in entries))
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
    stderr.close()
    with open(result_path, "w") as f:
        json.dump({"found": found, "entries": entries, "stderr": open(stderr_path).read()}, f)


def parse_journal(data):
    """journald's native protocol: KEY=value lines, or KEY\\n<le64 size><bytes>\\n."""
    fields = {}
    i = 0
    while i < len(data):
        newline = data.find(b"\n", i)
        if newline < 0:
            break
        line = data[i:newline]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            fields[key.decode()] = value.decode(errors="replace")
            i = newline + 1
        else:
            size = int.from_bytes(data[newline + 1:newline + 9], "little")
            fields[line.decode()] = data[newline + 9:newline + 9 + size].decode(errors="replace")
            i = newline + 9 + size + 1
    return fields


def test_journal(bin_dir, work):
    result = os.path.join(work, "journal.json")
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, os.path.abspath(__file__),
                          "--journal-child", bin_dir, work, result], capture_output=True, text=True, timeout=DEADLINE * 3)
    if not check(run.returncode == 0 and os.path.exists(result), f"journal run in a private mount namespace ({run.stderr[-500:]})"):
        return
    data = json.load(open(result))
    entries = data["entries"]
    check(data["found"], f"the gateway's events reached the journal socket ({len(entries)} entries)")
    ready = [e for e in entries if e.get("MESSAGE", "").startswith("ready:")]
    check(bool(ready) and ready[0].get("PRIORITY") == "6" and ready[0].get("SYSLOG_IDENTIFIER") == "leostream-gateway",
          "journal entry 'ready:' has PRIORITY=6 and SYSLOG_IDENTIFIER=leostream-gateway")
    forward = [e for e in entries if e.get("RULE_ID") == "desk"]
    check(bool(forward) and forward[0].get("TARGET", "").startswith("127.0.0.1:"),
          f"journal entry for the forward has RULE_ID=desk and TARGET ({forward[:1]})")
    refused = [e for e in entries if e.get("REASON") == "not_allowed"]
    check(bool(refused) and refused[0].get("CLIENT", "").startswith("127.0.0.1:") and refused[0].get("PRIORITY") == "4",
          f"a refused client is a journal entry with CLIENT, REASON=not_allowed, PRIORITY=4 ({refused[:1]})")
    check(data["stderr"].strip() == "", f"nothing went to stderr while the journal took the log ({data['stderr'][:300]!r})")


def test_socket_activation(bin_dir, work):
    """The forward's listening socket comes from the 'service manager' (the
    test), bound without SO_REUSEPORT so the gateway could not bind the
    address itself; a client that connected before the gateway started is
    served from the socket's backlog."""
    echo = EchoServer()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    forward = listener.getsockname()[1]
    metrics = free_port()
    config = os.path.join(work, "activated.conf")
    with open(config, "w") as f:
        f.write(f"log_level = info\nmetrics_listen = 127.0.0.1:{metrics}\n\n[forward activated]\n"
                f"listen = 127.0.0.1:{forward}\ntarget = 127.0.0.1:{echo.tcp.getsockname()[1]}\nallow = 127.0.0.0/8\n")
    early = socket.create_connection(("127.0.0.1", forward), timeout=DEADLINE)   # waits in the backlog
    early.sendall(b"queued before the gateway started")
    fd = listener.fileno()
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="activated")
    for key in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC"):
        env.pop(key, None)
    log = open(os.path.join(work, "activated.log"), "w")
    # LISTEN_PID must be the daemon's own pid: the shell sets it to $$ and execs the gateway.
    proc = subprocess.Popen(["sh", "-c", 'LISTEN_PID=$$ exec "$0" "$@"', os.path.join(bin_dir, "leostream-gateway"),
                             "serve", "--config", config, "--state-dir", os.path.join(work, "state-activated")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, close_fds=False,
                            preexec_fn=lambda: os.dup2(fd, 3))
    try:
        early.settimeout(DEADLINE)
        got = b""
        try:
            while len(got) < 33:
                chunk = early.recv(64)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        check(got == b"queued before the gateway started",
              f"socket activation: a client queued in the passed socket's backlog is relayed ({got!r})")
        payload = os.urandom(10_000)
        check(tcp_round_trip(forward, payload) == payload, "socket activation: new clients relayed on the passed socket")
        check(eventually(lambda: "passed by the service manager" in open(os.path.join(work, "activated.log")).read()),
              "socket activation: the gateway logs the adopted listener")
    finally:
        early.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        listener.close()
        if failures:
            print(open(os.path.join(work, "activated.log")).read()[-3000:], file=sys.stderr)


def test_broker(bin_dir, work):
    broker = os.path.join(bin_dir, "leostream-broker")
    version = subprocess.run([broker, "--version"], capture_output=True, text=True)
    check(version.returncode == 0 and "(commit " in version.stdout, f"leostream-broker --version names the commit: {version.stdout.strip()!r}")
    for other in ("pcoip-security-gateway", "pcoip-connection-manager", "pcoip-cmsg-setup"):
        v = subprocess.run([os.path.join(bin_dir, other), "--version"], capture_output=True, text=True)
        check(v.returncode == 0 and "(commit " in v.stdout, f"{other} --version names the commit: {v.stdout.strip()!r}")

    port = free_port()
    password = os.path.join(work, "admin-password")
    with open(password, "w") as f:
        f.write("correct horse battery\n")
    os.chmod(password, 0o600)
    proc, notify, log = start_daemon(work, "broker", [broker, "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(work, "broker"),
                                                      "--admin-password-file", password, "--bcrypt-cost", "4", "--plain-http"])
    try:
        if not check(eventually(lambda: notify.count("READY=1") >= 1 or proc.poll() is not None) and proc.poll() is None,
                     "broker sent READY=1"):
            return
        check(accepts(port), "the broker's listener accepts as soon as READY=1 arrived")
        check(eventually(lambda: notify.count("WATCHDOG=1") >= 3), "broker: WATCHDOG=1 pings keep coming")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/session/login", method="POST",
                                         data=json.dumps({"user_login": "admin", "password": "wrong"}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=DEADLINE)
            status = 200
        except urllib.error.HTTPError as error:
            status = error.code
        check(status == 401, f"a wrong password is refused ({status})")
        _, families, text = scrape(f"http://127.0.0.1:{port}/metrics")
        counted = [s for f in families.values() for s in f.samples
                   if s.name in ("hb_requests", "hb_requests_total") and s.labels.get("http_response_status_code") == "401"]
        check(bool(counted) and counted[0].value >= 1 and "login" in json.dumps(counted[0].labels),
              f"broker /metrics counts the refused login by route and status ({counted[:1]})")
        sigterm_stops(proc, notify, "broker")
    finally:
        finish_daemon(proc, notify, log, work, "broker")


def test_security_gateway(bin_dir, work):
    sg = os.path.join(bin_dir, "pcoip-security-gateway")
    key, cert = os.path.join(work, "cm.key"), os.path.join(work, "cm.crt")
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-new", "-key", key, "-days", "2", "-subj", "/CN=ops-cm", "-out", cert],
                   check=True, capture_output=True)
    listen, control, source = free_port(), free_port(), free_port()
    config = os.path.join(work, "SecurityGateway.conf")
    with open(config, "w") as f:
        f.write(f"GatewayGroup = ops\nJwtVerifyingCert = {cert}\nListenAddress = 127.0.0.1:{listen}\n"
                f"ControlListen = 127.0.0.1:{control}\nAgentSourcePort = {source}\n"
                # Plain HTTP on loopback, asked for explicitly (the TLS path has its own tests); the log says so.
                "ControlPlainHTTP = true\n")
    proc, notify, log = start_daemon(work, "sg", [sg, "serve", "--config", config, "--data-dir", os.path.join(work, "sg-data")])
    try:
        if not check(eventually(lambda: notify.count("READY=1") >= 1 or proc.poll() is not None) and proc.poll() is None,
                     "Security Gateway sent READY=1"):
            return
        check(accepts(listen) and accepts(control), "its session and control listeners accept as soon as READY=1 arrived")
        check(eventually(lambda: notify.count("WATCHDOG=1") >= 3), "Security Gateway: WATCHDOG=1 pings keep coming")
        grant = subprocess.run([sg, "grant", "--jwt-signing-key", key, "--audience", "ops", "--agent", "127.0.0.1:9",
                                "--sni", "agent.ops.test", "--session-id", "ops-1", "--lifetime", "600"],
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        request = urllib.request.Request(f"http://127.0.0.1:{control}/v1/sessions", method="POST",
                                         data=json.dumps({"grant": grant}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=DEADLINE) as answer:
            check(answer.status == 201, f"a grant is prepared (HTTP {answer.status})")
        with socket.create_connection(("127.0.0.1", listen), timeout=DEADLINE) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")   # not TLS: refused by the SNI inspector
            s.settimeout(DEADLINE)
            try:
                s.recv(16)
            except OSError:
                pass

        def figures():
            _, fam, _ = scrape(f"http://127.0.0.1:{control}/metrics")
            return fam
        check(eventually(lambda: sample(figures(), "sg_grants_refused", "sg_grants_refused_total", reason="not_tls") == 1),
              "/metrics: sg_grants_refused_total{reason=not_tls} is 1 after one non-TLS client")
        families = figures()
        prepared = [x for f in families.values() for x in f.samples
                    if x.name in ("sg_grants_prepare", "sg_grants_prepare_total") and x.labels.get("result") == "prepared"]
        check(bool(prepared) and prepared[0].value == 1, f"/metrics: sg_grants_prepare_total{{result=prepared}} is 1 ({prepared[:1]})")
        check(sample(families, "sg_grants_prepared", "sg_grants_prepared") == 1, "/metrics: sg_grants_prepared is 1")
        # Two connections: the readiness probe (accepts) and the non-TLS client.
        check(sample(families, "relay_connections_accepted", "relay_connections_accepted_total") == 2,
              "/metrics: the relay's families on the Security Gateway (2 connections accepted)")
        before = len(notify.all())
        os.kill(proc.pid, signal.SIGHUP)
        reloading = lambda: notify.index_of("RELOADING=1", after=before - 1)
        check(eventually(lambda: reloading() is not None and notify.index_of("READY=1", after=reloading()) is not None),
              "Security Gateway: SIGHUP -> RELOADING=1 then READY=1")
        sigterm_stops(proc, notify, "Security Gateway")
    finally:
        finish_daemon(proc, notify, log, work, "sg")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--journal-child":
        journal_child(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"[{NAME}] FAIL: needs root (a private mount namespace for the journal socket)", file=sys.stderr)
        return 1
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            print(f"[{NAME}] FAIL: {tool} is missing (util-linux)", file=sys.stderr)
            return 1
    bin_dir = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="service-ops.")
    try:
        test_gateway(bin_dir, work)
        test_journal(bin_dir, work)
        test_socket_activation(bin_dir, work)
        test_broker(bin_dir, work)
        test_security_gateway(bin_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[{NAME}] {passed} passed, {len(failures)} failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
