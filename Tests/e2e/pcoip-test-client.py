#!/usr/bin/env python3
"""A PCoIP-like client for Tests/e2e/connection-manager-netns.sh and
Bench/cm-bench: it speaks the PCoIP broker protocol to a Connection Manager
over HTTPS (POST /pcoip-broker/xml, the JSESSIONID cookie, chunked answers),
then TLS with the allocation's SNI to the Security Gateway it was given, and
UDP to the same address. Standard library only. Each subcommand prints what
it found as one JSON object on stdout, its checks on stderr, and exits 0
when every check held, 1 otherwise (2 on bad usage).

  session    hello, authenticate, get-resource-list, allocate-resource (the
             resource named --resource), then a TLS session through the
             target (an `openssl s_server -rev` agent: a line comes back
             reversed) and a datagram through it (the agent's UDP echo names
             the source port it saw). With --hold FILE it keeps the TLS
             session until FILE appears, then checks it again; with
             --failover it then connects again, to the first alternate
             target, with the same SNI (the same grant), and checks TLS and
             UDP there too.
  message    one raw request body (--body, XML text) with an optional
             session (--login USER:PASSWORD first), printing the answer's
             message name and result-id; --expect RESULT checks it.
  expired    logs in, has the session ended at the broker (--end-session
             COMMAND runs a shell command that does it), then lists:
             the answer must be the protocol's failure.
  load       --clients N threads at once, each a full hello → allocate of
             --resource; counts successes and each failure result; every
             request must be answered (no hang) within --timeout.
  rate       sessions per second end to end (login → allocation → a TLS
             ClientHello with the target's SNI through the gateway → the
             agent's first byte back; the agent echoes), --count sessions on
             --workers threads; --reuse-login logs in once per worker and
             measures allocations alone.
"""
import argparse
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

VERSION = "2.1"


def log(message):
    print(f"[pcoip-client] {message}", file=sys.stderr, flush=True)


def host_port(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text}")
    return host.strip("[]"), int(port)


class Broker:
    """One client's conversation with a Connection Manager: its cookie and log id."""

    def __init__(self, cm, cafile=None, timeout=30, log_id=None):
        self.host, self.port = cm
        self.context = ssl.create_default_context(cafile=cafile) if cafile else ssl._create_unverified_context()
        if cafile:
            self.context.check_hostname = False  # the CM's certificate names its public address
        self.timeout = timeout
        self.cookie = None
        self.log_id = log_id
        self.connection = None
        self.last_headers = {}

    def post(self, body):
        if self.connection is None:
            self.connection = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=self.timeout)
        headers = {"Content-Type": "application/xml; charset=UTF-8"}
        if self.cookie:
            headers["Cookie"] = f"JSESSIONID={self.cookie}"
        if self.log_id:
            headers["Client-Log-Id"] = self.log_id
        try:
            self.connection.request("POST", "/pcoip-broker/xml", body=body.encode(), headers=headers)
            response = self.connection.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            self.connection.close()
            self.connection = None
            raise
        self.last_headers = {name: value for name, value in response.getheaders()}
        for name, value in response.getheaders():
            if name == "Set-Cookie" and value.startswith("JSESSIONID="):
                self.cookie = value.split(";", 1)[0].split("=", 1)[1] or None
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        return ET.fromstring(data), response

    def request(self, inner):
        root, response = self.post(f'<?xml version="1.0" encoding="UTF-8"?><pcoip-client version="{VERSION}">{inner}</pcoip-client>')
        if root.tag != "pcoip-broker" or len(root) != 1:
            raise RuntimeError(f"not a broker answer: <{root.tag}> with {len(root)} children")
        return root[0], response

    def hello(self):
        return self.request("<hello><client-info><product-name>pcoip-test-client</product-name>"
                            "<product-version>1.0</product-version><platform>linux</platform><locale>en_US</locale>"
                            f"<hostname>{socket.gethostname()}</hostname></client-info></hello>")[0]

    def authenticate(self, user, password, domain=""):
        return self.request(f'<authenticate method="password"><username>{esc(user)}</username>'
                            f"<password>{esc(password)}</password><domain>{esc(domain)}</domain></authenticate>")[0]

    def resources(self):
        return self.request("<get-resource-list><resource-type>DESKTOP</resource-type>"
                            "<resource-protocol>PCOIP</resource-protocol></get-resource-list>")[0]

    def allocate(self, resource_id):
        return self.request(f"<allocate-resource><resource-id>{esc(resource_id)}</resource-id><resource-type>DESKTOP</resource-type>"
                            "<resource-protocol>PCOIP</resource-protocol><client-location>e2e</client-location></allocate-resource>")[0]

    def bye(self):
        return self.request("<bye/>")[0]

    def close(self):
        if self.connection:
            self.connection.close()


def esc(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def result(message):
    return message.findtext("result/result-id")


def login_and_allocate(broker, user, password, resource):
    hello = broker.hello()
    if hello.tag != "hello-resp":
        raise RuntimeError(f"hello: got <{hello.tag}> {result(hello)}")
    auth = broker.authenticate(user, password)
    if result(auth) != "AUTH_SUCCESSFUL_AND_COMPLETE":
        raise RuntimeError(f"authenticate: {result(auth)} {auth.findtext('result/result-str')}")
    listing = broker.resources()
    if result(listing) != "LIST_SUCCESSFUL":
        raise RuntimeError(f"get-resource-list: {result(listing)}")
    names = {r.findtext("resource-name"): r.findtext("resource-id") for r in listing.findall("resource")}
    if resource not in names:
        raise RuntimeError(f"resource {resource} not listed (got {sorted(names)})")
    allocation = broker.allocate(names[resource])
    if result(allocation) != "ALLOC_SUCCESSFUL":
        raise RuntimeError(f"allocate-resource: {result(allocation)} {allocation.findtext('result/result-str')}")
    target = {key: allocation.findtext(f"target/{key}") for key in ("ip-address", "hostname", "sni", "port", "session-id", "connect-tag")}
    target["port"] = int(target["port"])
    alternates = [(a.findtext("ip-address"), int(a.findtext("port"))) for a in allocation.findall("alternate-targets/alternate-target")]
    return listing, target, alternates


def tls_line(address, sni, line, timeout=30):
    """A TLS session through the gateway with SNI `sni` to an `openssl s_server -rev` agent."""
    context = ssl._create_unverified_context()
    raw = socket.create_connection(address, timeout=timeout)
    tls = context.wrap_socket(raw, server_hostname=sni)
    tls.sendall(line.encode() + b"\n")
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data and time.monotonic() < deadline:
        chunk = tls.recv(4096)
        if not chunk:
            break
        data += chunk
    return tls, data.decode(errors="replace").strip()


def udp_exchange(address, payload, timeout=2.0, tries=10):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    try:
        for _ in range(tries):
            sock.sendto(payload.encode(), address)
            try:
                data, _ = sock.recvfrom(2048)
                return data.decode(errors="replace")
            except socket.timeout:
                continue
        return None
    finally:
        sock.close()


def session_main(args):
    ok = True
    found = {}

    def check(condition, what):
        nonlocal ok
        log(("ok: " if condition else "FAILED: ") + what)
        ok = ok and condition

    broker = Broker(args.cm, args.cafile)
    try:
        listing, target, alternates = login_and_allocate(broker, args.user, args.password, args.resource)
    except Exception as error:
        log(f"FAILED: {error}")
        print(json.dumps({"error": str(error)}))
        return 1
    found.update(target=target, alternates=alternates, cookie_header_seen="Set-Cookie" in broker.last_headers)
    check(broker.cookie is not None, "the Connection Manager set JSESSIONID with a header spelled Set-Cookie")
    if args.expect_sg:
        check(target["ip-address"] == args.expect_sg, f"the target is the Security Gateway {args.expect_sg} (got {target['ip-address']}:{target['port']})")
    if args.expect_sni:
        check(target["sni"] == args.expect_sni, f"sni kept as the agent issued it: {target['sni']}")
    check(bool(target["session-id"]) and bool(target["connect-tag"]), "session-id and connect-tag kept")
    address = (target["ip-address"], target["port"])
    tls, answer = tls_line(address, target["sni"], "hello agent")
    check(answer == "tnega olleh", f"TLS through {address[0]}:{address[1]} with SNI {target['sni']}: the agent answered {answer!r}")
    echo = udp_exchange(address, "ping")
    found["udp"] = echo
    if args.expect_udp_port:
        check(echo is not None and echo.startswith("ping|") and echo.split("|")[1] == str(args.expect_udp_port),
              f"UDP through the gateway reached the agent from port {args.expect_udp_port} (answer {echo!r})")
    if args.hold:
        with open(args.ready, "w") as f:
            f.write(json.dumps(found))
        log(f"holding the session until {args.hold} exists")
        deadline = time.monotonic() + args.hold_seconds
        while not os.path.exists(args.hold) and time.monotonic() < deadline:
            time.sleep(0.05)
        if args.failover:
            try:
                tls.close()
            except OSError:
                pass
            check(bool(alternates), f"the allocation named failover gateways: {alternates}")
            if alternates:
                sibling = alternates[0]
                tls2, answer2 = tls_line(sibling, target["sni"], "after failover")
                check(answer2 == "revoliaf retfa", f"failover: TLS through {sibling[0]}:{sibling[1]} with the same grant (SNI {target['sni']}): {answer2!r}")
                echo2 = udp_exchange(sibling, "ping2")
                if args.expect_udp_port:
                    check(echo2 is not None and echo2.split("|")[1] == str(args.expect_udp_port),
                          f"failover: UDP through {sibling[0]} reached the agent from port {args.expect_udp_port} ({echo2!r})")
                tls2.close()
        else:
            tls.sendall(b"still here\n")
            data = tls.recv(4096).decode(errors="replace").strip()
            check(data == "ereh llits", f"the session still carries bytes after the hold: {data!r}")
    try:
        tls.close()
    except OSError:
        pass
    bye = broker.bye()
    check(bye.tag == "bye-resp", "bye answered")
    broker.close()
    print(json.dumps(found))
    return 0 if ok else 1


def message_main(args):
    broker = Broker(args.cm, args.cafile)
    if args.login:
        user, _, password = args.login.partition(":")
        broker.hello()
        auth = broker.authenticate(user, password)
        if result(auth) != "AUTH_SUCCESSFUL_AND_COMPLETE":
            log(f"FAILED: login: {result(auth)}")
            return 1
    try:
        root, _ = broker.post(args.body)
    except ET.ParseError as error:
        log(f"FAILED: the answer is not XML: {error}")
        return 1
    message = root[0] if len(root) else root
    found = {"root": root.tag, "message": message.tag, "result": result(message), "text": message.findtext("result/result-str")}
    print(json.dumps(found))
    if args.expect and found["result"] != args.expect:
        log(f"FAILED: expected {args.expect}, got {found}")
        return 1
    log(f"ok: {found['message']} {found['result']}: {found['text']}")
    return 0


def expired_main(args):
    broker = Broker(args.cm, args.cafile)
    broker.hello()
    auth = broker.authenticate(args.user, args.password)
    if result(auth) != "AUTH_SUCCESSFUL_AND_COMPLETE":
        log(f"FAILED: login: {result(auth)}")
        return 1
    first = broker.resources()
    if result(first) != "LIST_SUCCESSFUL":
        log(f"FAILED: the first list: {result(first)}")
        return 1
    subprocess.run(args.end_session, shell=True, check=True)
    after = broker.resources()
    found = {"before": result(first), "after": result(after), "text": after.findtext("result/result-str")}
    print(json.dumps(found))
    if result(after) != args.expect:
        log(f"FAILED: after the broker session ended: {found}")
        return 1
    log(f"ok: the ended broker session gets {result(after)}: {found['text']}")
    return 0


def load_main(args):
    counts = {}
    lock = threading.Lock()
    hung = []
    times = []
    barrier = threading.Barrier(args.clients)

    def one(i):
        broker = Broker(args.cm, args.cafile, timeout=args.timeout)
        outcome = None
        started = time.monotonic()
        try:
            barrier.wait(timeout=args.timeout)
            broker.hello()
            auth = broker.authenticate(args.user, args.password)
            if result(auth) != "AUTH_SUCCESSFUL_AND_COMPLETE":
                outcome = result(auth) or "auth-failed"
            else:
                listing = broker.resources()
                if result(listing) != "LIST_SUCCESSFUL":
                    outcome = result(listing)
                else:
                    ids = {r.findtext("resource-name"): r.findtext("resource-id") for r in listing.findall("resource")}
                    outcome = result(broker.allocate(ids.get(args.resource, "0")))
        except (socket.timeout, TimeoutError):
            outcome = "timeout"
        except Exception as error:
            outcome = f"error:{type(error).__name__}"
        finally:
            broker.close()
        elapsed = time.monotonic() - started
        with lock:
            if elapsed > args.timeout:
                hung.append(i)
            counts[outcome] = counts.get(outcome, 0) + 1
            times.append(elapsed)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times.sort()
    found = {"counts": counts, "hung": len(hung), "clients": args.clients,
             "p50_ms": round(times[len(times) // 2] * 1000, 1) if times else None,
             "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))] * 1000, 1) if times else None,
             "max_ms": round(times[-1] * 1000, 1) if times else None}
    print(json.dumps(found, sort_keys=True))
    return 0


def client_hello(server_name):
    """The ClientHello Python's TLS stack sends for `server_name` (TLS record bytes)."""
    context = ssl._create_unverified_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def first_byte(target, timeout=30):
    """Connects to the gateway, sends a ClientHello with the target's SNI, waits for the agent's first bytes."""
    sock = socket.create_connection((target["ip-address"], target["port"]), timeout=timeout)
    try:
        sock.sendall(client_hello(target["sni"]))
        data = sock.recv(1)
        if not data:
            raise RuntimeError("the gateway closed without a byte")
    finally:
        sock.close()


def rate_main(args):
    """Sessions end to end: login (hello, authenticate, list, allocate) → first relayed byte.
    With --reuse-login, one login per worker and --count allocations on it (the CM's
    establishment path: broker allocate, grant signing, prepares, rewrite)."""
    lock = threading.Lock()
    done = []
    failures = {}
    latencies = []

    def worker(indices):
        broker = None
        resource_id = None
        for i in indices:
            started = time.monotonic()
            try:
                if broker is None or not args.reuse_login:
                    if broker:
                        broker.close()
                    broker = Broker(args.cm, args.cafile)
                    listing, target, _ = login_and_allocate(broker, args.user, args.password, args.resource)
                    resource_id = {r.findtext("resource-name"): r.findtext("resource-id") for r in listing.findall("resource")}[args.resource]
                else:
                    allocation = broker.allocate(resource_id)
                    if result(allocation) != "ALLOC_SUCCESSFUL":
                        raise RuntimeError(f"{result(allocation)}: {allocation.findtext('result/result-str')}")
                    target = {key: allocation.findtext(f"target/{key}") for key in ("ip-address", "sni", "port")}
                    target["port"] = int(target["port"])
                first_byte(target)
                with lock:
                    done.append(i)
                    latencies.append(time.monotonic() - started)
            except Exception as error:
                with lock:
                    key = str(error)[:80]
                    failures[key] = failures.get(key, 0) + 1
                if broker:
                    broker.close()
                broker = None
        if broker:
            broker.close()

    started = time.monotonic()
    parts = [list(range(args.count))[w::args.workers] for w in range(args.workers)]
    threads = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000 if latencies else float("nan")

    print(f"established={len(done)} total={args.count} seconds={elapsed:.2f} per_s={len(done) / elapsed:.1f} "
          f"p50_ms={pct(50):.1f} p99_ms={pct(99):.1f} failures={json.dumps(failures, sort_keys=True)}")
    return 0 if len(done) == args.count else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cm", type=host_port, required=True, help="the Connection Manager's HOST:PORT")
    common.add_argument("--cafile", help="verify the Connection Manager with this PEM (else: not verified)")
    s = sub.add_parser("session", parents=[common])
    s.add_argument("--user", required=True)
    s.add_argument("--password", required=True)
    s.add_argument("--resource", required=True)
    s.add_argument("--expect-sg")
    s.add_argument("--expect-sni")
    s.add_argument("--expect-udp-port", type=int)
    s.add_argument("--hold")
    s.add_argument("--ready", default="/dev/null")
    s.add_argument("--hold-seconds", type=float, default=120)
    s.add_argument("--failover", action="store_true")
    m = sub.add_parser("message", parents=[common])
    m.add_argument("--body", required=True)
    m.add_argument("--login")
    m.add_argument("--expect")
    e = sub.add_parser("expired", parents=[common])
    e.add_argument("--user", required=True)
    e.add_argument("--password", required=True)
    e.add_argument("--end-session", required=True)
    e.add_argument("--expect", default="LIST_FAILED_NOT_AUTHENTICATED")
    l = sub.add_parser("load", parents=[common])
    l.add_argument("--user", required=True)
    l.add_argument("--password", required=True)
    l.add_argument("--resource", required=True)
    l.add_argument("--clients", type=int, default=100)
    l.add_argument("--timeout", type=float, default=60)
    r = sub.add_parser("rate", parents=[common])
    r.add_argument("--user", required=True)
    r.add_argument("--password", required=True)
    r.add_argument("--resource", required=True)
    r.add_argument("--count", type=int, default=200)
    r.add_argument("--workers", type=int, default=8)
    r.add_argument("--reuse-login", action="store_true", help="one login per worker, then allocations on it")
    args = parser.parse_args()
    handler = {"session": session_main, "message": message_main, "expired": expired_main, "load": load_main, "rate": rate_main}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
