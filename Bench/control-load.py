#!/usr/bin/env python3
"""Load tool of Bench/control-bench (issue 4): drives a gateway's control
endpoint and a broker's connect call, and prints one `key=value` line per
measurement.

  push-latency  signed PUT /control/v1/rules/{id} (method 0, TCP, to an echo
                target), then a TCP connection through the port the gateway
                answered that completes a 64-byte echo; the time from sending
                the PUT to the echo's last byte, one rule at a time (each rule
                is deleted afterwards, untimed). Prints p50/p99/mean/max in ms,
                and from the gateway's own /metrics histogram the share of
                those PUTs it handled within 1 ms and the bucket of their p99.
  rule-rate     WORKERS threads each PUT a rule then DELETE it, for SECONDS;
                prints pushes+deletes per second (and pairs per second).
  connect-rate  WORKERS threads POST /v1/connect to the broker (which chooses
                the gateway and pushes the rule to it) COUNT times in all, then
                DELETE /v1/connect/{rule_id} each; prints calls per second of
                both and their p50/p99 in ms.
  rules         how many rules the gateway holds (signed GET /control/v1/rules).
  fill          pushes COUNT rules that stay (the rules held while others measure).
  put           one push from --json; prints the port (Bench/kernel-bench).
--forwarding-path kernel|userspace|offload sets the pushes' forwarding_path.

Secrets (the control key, the session id) are read from files and never
printed. Standard library only.
"""
import argparse
import http.client
import json
import os
import secrets
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "python"))
from leocontrol import ControlClient, read_key  # noqa: E402


def echo_through(host, port, size=64):
    payload = os.urandom(size)
    with socket.create_connection((host, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(payload)
        got = b""
        while len(got) < size:
            chunk = s.recv(size - len(got))
            if not chunk:
                raise RuntimeError(f"echo through port {port}: closed after {len(got)} of {size} bytes")
            got += chunk
    if got != payload:
        raise RuntimeError(f"echo through port {port}: wrong bytes")


def percentile(values, p):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def control_from(args):
    host, port = args.control.rsplit(":", 1)
    return host, int(port), args.gateway_id, read_key(args.key_file)


def extra_fields(args):
    """Push fields beyond the defaults: the forwarding path when asked."""
    path = getattr(args, "forwarding_path", None)
    return {"forwarding_path": path} if path else {}


def fill(args):
    """Pushes COUNT rules (ids fill-N, method 0, TCP) that stay: the rules a
    gateway holds while the other scenarios measure."""
    host, port, gid, key = control_from(args)
    client = ControlClient(host, port, gid, key)
    extra = extra_fields(args)
    start = time.perf_counter()
    for i in range(args.count):
        client.put_rule(f"fill-{i}", args.target, unused_expiry_s=7 * 24 * 3600, **extra)
    elapsed = time.perf_counter() - start
    print(f"scenario=fill count={args.count} seconds={elapsed:.2f} rules_per_s={args.count / elapsed:.0f}")


def put(args):
    """One push from JSON; prints the port the gateway answered."""
    host, port, gid, key = control_from(args)
    status, answer = ControlClient(host, port, gid, key).put(args.id, json.loads(args.json))
    if status not in (200, 201):
        sys.exit(f"PUT {args.id}: HTTP {status}: {answer}")
    print(answer["port"])


def put_histogram(client):
    """The gateway's own histogram of PUT handling times (its /metrics):
    cumulative counts by upper bound in seconds."""
    status, data = client.request("GET", "/metrics")
    if status != 200:
        return {}
    buckets = {}
    for line in data.decode().splitlines():
        if not line.startswith("gateway_rule_push_duration_seconds_bucket{") or 'method="PUT"' not in line:
            continue
        le = line.split('le="', 1)[1].split('"', 1)[0]
        buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def server_side(before, after):
    """From two histogram scrapes: the share of PUTs the gateway handled within
    1 ms, and the bucket bound holding the 99th percentile."""
    delta = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = delta.get(float("inf"), 0)
    if total <= 0:
        return "server_within_1ms=nan server_p99_le_ms=nan"
    within = delta.get(0.001, 0) / total
    p99 = min((le for le, n in delta.items() if n >= 0.99 * total), default=float("inf"))
    return f"server_within_1ms={within:.4f} server_p99_le_ms={p99 * 1000:g}"


def push_latency(args):
    host, port, gid, key = control_from(args)
    client = ControlClient(host, port, gid, key)
    public = args.public_host
    extra = extra_fields(args)
    for _ in range(args.warmup):
        rid = secrets.token_hex(16)
        echo_through(public, client.put_rule(rid, args.target, **extra))
        client.delete_rule(rid)
    before = put_histogram(client)
    samples = []
    for _ in range(args.count):
        rid = secrets.token_hex(16)
        start = time.perf_counter()
        rule_port = client.put_rule(rid, args.target, **extra)
        echo_through(public, rule_port)
        samples.append((time.perf_counter() - start) * 1000)
        client.delete_rule(rid)
    print(f"scenario=push-latency count={len(samples)} p50_ms={percentile(samples, 50):.3f} "
          f"p99_ms={percentile(samples, 99):.3f} mean_ms={sum(samples) / len(samples):.3f} max_ms={max(samples):.3f} "
          f"{server_side(before, put_histogram(client))}")


def rule_rate(args):
    host, port, gid, key = control_from(args)
    stop = time.perf_counter() + args.seconds
    counts = [0] * args.workers
    errors = []

    def worker(i):
        client = ControlClient(host, port, gid, key)
        try:
            while time.perf_counter() < stop:
                rid = secrets.token_hex(16)
                client.put_rule(rid, args.target, **extra_fields(args))
                client.delete_rule(rid)
                counts[i] += 2
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(str(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    if errors:
        print(f"error: rule-rate: {errors[0]}", file=sys.stderr)
        sys.exit(1)
    ops = sum(counts)
    print(f"scenario=rule-rate workers={args.workers} seconds={elapsed:.2f} ops={ops} "
          f"ops_per_s={ops / elapsed:.0f} pairs_per_s={ops / 2 / elapsed:.0f}")


def connect_rate(args):
    # Several brokers (a cluster on one database): worker i calls broker i mod n.
    brokers = [b.rsplit(":", 1) for b in args.broker.split(",")]
    sid = open(args.sid_file).read().strip()
    headers = {"Authorization": f"Bearer {sid}", "Content-Type": "application/json"}
    body = json.dumps({"desktop_id": args.desktop_id, "protocol": args.protocol}).encode()
    lock = threading.Lock()
    remaining = [args.count]
    rule_ids, connect_ms, delete_ms, errors = [], [], [], []

    def take():
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def connector(index):
        host, port = brokers[index % len(brokers)]
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            while take():
                start = time.perf_counter()
                conn.request("POST", "/v1/connect", body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"POST /v1/connect: HTTP {reply.status}: {data[:200]!r}")
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    connect_ms.append(elapsed)
                    rule_ids.append(json.loads(data)["rule_id"])
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))

    def deleter(index, ids):
        host, port = brokers[index % len(brokers)]
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            for rid in ids:
                start = time.perf_counter()
                conn.request("DELETE", f"/v1/connect/{rid}", headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                if reply.status != 204:
                    raise RuntimeError(f"DELETE /v1/connect: HTTP {reply.status}: {data[:200]!r}")
                with lock:
                    delete_ms.append((time.perf_counter() - start) * 1000)
        except Exception as e:  # noqa: BLE001
            errors.append(str(e))

    def run(threads):
        begin = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - begin

    connect_s = run([threading.Thread(target=connector, args=(i,)) for i in range(args.workers)])
    if errors:
        print(f"error: connect-rate: {errors[0]}", file=sys.stderr)
        sys.exit(1)
    shares = [rule_ids[i::args.workers] for i in range(args.workers)]
    delete_s = run([threading.Thread(target=deleter, args=(i, s)) for i, s in enumerate(shares)])
    if errors:
        print(f"error: connect-rate: {errors[0]}", file=sys.stderr)
        sys.exit(1)
    print(f"scenario=connect-rate workers={args.workers} brokers={len(brokers)} count={len(connect_ms)} "
          f"connect_per_s={len(connect_ms) / connect_s:.0f} connect_p50_ms={percentile(connect_ms, 50):.2f} "
          f"connect_p99_ms={percentile(connect_ms, 99):.2f} "
          f"disconnect_per_s={len(delete_ms) / delete_s:.0f} disconnect_p50_ms={percentile(delete_ms, 50):.2f} "
          f"disconnect_p99_ms={percentile(delete_ms, 99):.2f}")


def count_rules(args):
    host, port, gid, key = control_from(args)
    status, data = ControlClient(host, port, gid, key).request("GET", "/control/v1/rules")
    if status != 200:
        print(f"error: GET /control/v1/rules: HTTP {status}: {data[:200]!r}", file=sys.stderr)
        sys.exit(1)
    print(f"scenario=rules count={len(json.loads(data))}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name in ("push-latency", "rule-rate", "rules", "fill", "put"):
        p = sub.add_parser(name)
        p.add_argument("--control", required=True, help="the gateway's control endpoint HOST:PORT")
        p.add_argument("--gateway-id", type=int, required=True)
        p.add_argument("--key-file", required=True, help="file with the gateway's control key")
        p.add_argument("--target", default="", help="the echo server HOST:PORT the rules point at")
        p.add_argument("--public-host", default="127.0.0.1", help="where the rules' ports listen")
        p.add_argument("--forwarding-path", choices=["userspace", "kernel", "offload"], default=None,
                       help="forwarding_path of the pushed rules (default: the gateway's)")
        if name == "push-latency":
            p.add_argument("--count", type=int, default=500)
            p.add_argument("--warmup", type=int, default=20)
        elif name == "fill":
            p.add_argument("--count", type=int, default=2000)
        elif name == "put":
            p.add_argument("--id", required=True)
            p.add_argument("--json", required=True, help="the push, as JSON")
        elif name == "rule-rate":
            p.add_argument("--seconds", type=float, default=5)
            p.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("connect-rate")
    p.add_argument("--broker", required=True, help="the broker's HOST:PORT (comma-separated for a cluster: workers spread over them)")
    p.add_argument("--sid-file", required=True, help="file with a logged-in session id")
    p.add_argument("--desktop-id", type=int, required=True)
    p.add_argument("--protocol", default="echo")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    for field in ("count", "workers", "seconds"):
        if getattr(args, field, 1) is not None and getattr(args, field, 1) <= 0:
            parser.error(f"--{field} must be positive")
    {"push-latency": push_latency, "rule-rate": rule_rate, "connect-rate": connect_rate,
     "rules": count_rules, "fill": fill, "put": put}[args.scenario](args)


if __name__ == "__main__":
    main()
