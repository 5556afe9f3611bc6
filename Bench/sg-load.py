#!/usr/bin/env python3
"""Load tool of Bench/sg-bench (issue 5): drives a Security Gateway on
loopback and prints one `key=value ...` line per measurement on stdout
(progress and errors on stderr). Standard library only.

  establish  session establishments: for each pre-signed grant (one JWT per
             line), POST /v1/sessions to the control endpoint (keep-alive),
             connect to the gateway from the next client address, send a TLS
             ClientHello carrying the grant's SNI, and wait for the first
             byte the agent echoes back; then close. WORKERS run at once.
             Prints establishments per second and p50/p99 of one
             establishment (prepare + connect + ClientHello + first byte).
             With --direct HOST:PORT: no prepare and no gateway, the same
             connect + ClientHello + first byte straight to that agent.
  sink       a TCP sink for bulk runs: counts what it receives per
             connection, and reports each connection's rate to stderr.
  bulk       bulk TCP throughput: STREAMS connections to TARGET, each first
             sends a ClientHello (the gateway needs it; the sink discards it),
             then as much as it can for SECONDS; the sink's count over the
             measured time is the figure. Prints Gbit/s received.
"""
import argparse
import http.client
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
import time


# host_port and client_hello are the e2e helper's (one ClientHello maker for both).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "e2e"))
from importlib import import_module  # noqa: E402

_helper = import_module("sg-netns-helper")
host_port = _helper.host_port
client_hello = _helper.client_hello


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else 0


# ---------------------------------------------------------------- establish

def establish_main(args):
    tokens = [line.strip() for line in open(args.grants) if line.strip()]
    names = [args.sni.replace("{n}", str(i)) for i in range(len(tokens))]
    hellos = [client_hello(name) for name in names]
    first = ipaddress.IPv4Address(args.first_client)
    host, port = args.control
    times = []
    failures = []
    lock = threading.Lock()

    def session(i, target, began):
        """Session i from its own client address: connect, ClientHello, first byte back; its time since `began`."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(10)
            sock.bind((str(first + i), 0))
            sock.connect(target)
            sock.sendall(hellos[i])
            if not sock.recv(1):
                raise RuntimeError("closed before the first byte")
            elapsed = time.perf_counter() - began
        finally:
            sock.close()
        with lock:
            times.append(elapsed)

    def prepare_batch(conn, indices):
        """Prepares the grants of `indices` in one POST {"grants": [...]}; every one must be 201."""
        body = json.dumps({"grants": [tokens[i] for i in indices]}).encode()
        conn.request("POST", "/v1/sessions", body=body, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        answer = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"batch prepare: HTTP {reply.status}: {answer[:200]!r}")
        statuses = [item.get("status") for item in json.loads(answer)["results"]]
        if statuses != [201] * len(indices):
            raise RuntimeError(f"batch prepare: statuses {statuses[:8]}...")

    def batch_worker(indices):
        # Batches of args.batch: their prepares in one call, then each session;
        # a session's time runs from its batch's start to its first byte.
        conn = _helper.control_connection(host, port)
        indices = list(indices)
        for start in range(0, len(indices), args.batch):
            batch = indices[start:start + args.batch]
            began = time.perf_counter()
            try:
                prepare_batch(conn, batch)
            except Exception as error:  # noqa: BLE001 - counted and shown
                with lock:
                    failures.extend(f"session {i}: {type(error).__name__}: {error}" for i in batch)
                conn.close()
                conn = _helper.control_connection(host, port)
                continue
            for i in batch:
                try:
                    session(i, args.sg, began)
                except Exception as error:  # noqa: BLE001 - counted and shown
                    with lock:
                        failures.append(f"session {i}: {type(error).__name__}: {error}")
        conn.close()

    def worker(indices):
        # --direct prepares nothing: no control connection (nor its CA).
        connect = (lambda: None) if args.direct else (lambda: _helper.control_connection(host, port))
        conn = connect()
        for i in indices:
            body = json.dumps({"grant": tokens[i]}).encode()
            began = time.perf_counter()
            try:
                if not args.direct:
                    conn.request("POST", "/v1/sessions", body=body, headers={"Content-Type": "application/json"})
                    reply = conn.getresponse()
                    reply.read()
                    if reply.status != 201:
                        raise RuntimeError(f"prepare: HTTP {reply.status}")
                session(i, args.direct or args.sg, began)
            except Exception as error:  # noqa: BLE001 - counted and shown
                with lock:
                    failures.append(f"session {i}: {type(error).__name__}: {error}")
                if conn is not None:
                    conn.close()
                conn = connect()
        if conn is not None:
            conn.close()

    began = time.perf_counter()
    if args.batch > 1 and args.direct:
        print("sg-load: --batch and --direct do not go together", file=sys.stderr)
        return 2
    if args.batch > 1:
        # Each worker its own contiguous share: a batch's grants are neighbours.
        share = (len(tokens) + args.workers - 1) // args.workers
        threads = [threading.Thread(target=batch_worker, args=(range(w * share, min(len(tokens), (w + 1) * share)),))
                   for w in range(args.workers)]
    else:
        threads = [threading.Thread(target=worker, args=(range(w, len(tokens), args.workers),)) for w in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    for failure in failures[:5]:
        print(f"sg-load: {failure}", file=sys.stderr)
    ms = [t * 1000 for t in times]
    print(f"sessions={len(times)} failed={len(failures)} workers={args.workers} batch={args.batch} seconds={wall:.2f} "
          f"per_s={len(times) / wall:.0f} p50_ms={percentile(ms, 50):.2f} p99_ms={percentile(ms, 99):.2f} "
          f"mean_ms={(sum(ms) / len(ms) if ms else 0):.2f} max_ms={max(ms) if ms else 0:.2f}", flush=True)
    if len(times) + len(failures) != len(tokens):
        # A worker that died (an exception outside a session) must not pass as a short run.
        print(f"sg-load: {len(tokens) - len(times) - len(failures)} session(s) never ran (a worker failed)", file=sys.stderr)
        return 1
    return 0 if not failures else 1


# ---------------------------------------------------------------- sink / bulk

def sink_main(args):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(args.listen)
    server.listen(64)
    counters = {"bytes": 0}
    lock = threading.Lock()

    def serve(conn):
        buffer = bytearray(4 << 20)
        view = memoryview(buffer)
        local = 0
        try:
            while True:
                n = conn.recv_into(view)
                if n == 0:
                    break
                local += n
                if local >= 1 << 24:
                    with lock:
                        counters["bytes"] += local
                    local = 0
        except OSError:
            pass
        with lock:
            counters["bytes"] += local
        conn.close()

    def report():
        # The bulk sender asks for the count over a side channel: one line "count" on a UDP port.
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(args.listen)
        while True:
            _, peer = udp.recvfrom(64)
            with lock:
                udp.sendto(str(counters["bytes"]).encode(), peer)

    threading.Thread(target=report, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def sink_count(sink):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(2)
    udp.sendto(b"count", sink)
    data, _ = udp.recvfrom(64)
    udp.close()
    return int(data)


def bulk_main(args):
    hello = client_hello(args.sni)
    payload = memoryview(bytes(4 << 20))
    stop = threading.Event()
    socks = []
    for _ in range(args.streams):
        sock = socket.create_connection(args.target, timeout=10)
        sock.sendall(hello)
        socks.append(sock)

    def pump(sock):
        try:
            while not stop.is_set():
                sock.sendall(payload)
        except OSError:
            pass

    threads = [threading.Thread(target=pump, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    before, began = sink_count(args.sink), time.perf_counter()
    time.sleep(args.seconds)
    after, ended = sink_count(args.sink), time.perf_counter()
    stop.set()
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
    for t in threads:
        t.join()
    gbits = (after - before) * 8 / (ended - began) / 1e9
    print(f"gbit_s={gbits:.2f} bytes={after - before} seconds={ended - began:.2f} streams={args.streams}", flush=True)
    return 0 if after > before else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("establish")
    e.add_argument("--control", type=host_port, required=True)
    e.add_argument("--sg", type=host_port, required=True)
    e.add_argument("--grants", required=True)
    e.add_argument("--sni", required=True, help="with {n}: the grant's index")
    e.add_argument("--first-client", default="127.1.0.1")
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--direct", type=host_port, help="no gateway: connect to this agent, without preparing")
    e.add_argument("--batch", type=int, default=1, help="N > 1: prepare N grants in one call ({\"grants\": [...]}), then their sessions")
    s = sub.add_parser("sink")
    s.add_argument("--listen", type=host_port, required=True)
    b = sub.add_parser("bulk")
    b.add_argument("--target", type=host_port, required=True)
    b.add_argument("--sink", type=host_port, required=True)
    b.add_argument("--sni", default="bulk.bench.test")
    b.add_argument("--streams", type=int, default=1)
    b.add_argument("--seconds", type=float, default=5)
    b.add_argument("--warmup", type=float, default=1)
    args = parser.parse_args()
    if args.command == "establish":
        sys.exit(establish_main(args))
    elif args.command == "sink":
        sink_main(args)
    else:
        sys.exit(bulk_main(args))


if __name__ == "__main__":
    main()
