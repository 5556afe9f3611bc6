#!/usr/bin/env python3
"""Hosts and clients of Tests/e2e/security-gateway-netns.sh (and Bench/sg-bench):
standard library only, one subcommand per role. Each prints what it checked
on stderr and exits 0 when every check held, 1 otherwise (2 on bad usage).

  agent      the agent host: a TCP echo (bytes come back as they came: the
             client's TLS ClientHello first) and/or a UDP echo that answers
             each datagram with `<payload>|<sender's port>` from the address
             it was sent to (IP_PKTINFO), so a client sees which source port
             the gateway used toward the agent.
  prepare    the Connection Manager's prepare calls: POST /v1/sessions with
             each grant of a file (one JWT per line), on keep-alive
             connections; every answer must be the expected status.
  reach      exits 0 when HOST answers at all (a TCP connect to port 9 that
             is accepted or refused), 1 when it does not within a second.
  udp-ping   one datagram from --bind to --to; expects the agent's answer
             naming --expect-port, or (--expect-none) no answer at all.
  sessions   many PCoIP-like sessions at once: from consecutive client
             addresses, each connects to the gateway, sends a real TLS
             ClientHello (made by Python's ssl module) carrying its own SNI,
             and checks the bytes come back (the agent echoes them); then a
             datagram from each address must come back from the agent via
             source port --expect-port; one more session must be refused
             (closed without a byte) when --expect-refused is given. It writes
             --ready-file, holds every session until --release-file appears,
             checks each still carries bytes, and closes them.
"""
import argparse
import asyncio
import http.client
import ipaddress
import json
import os
import selectors
import socket
import ssl
import struct
import sys
import threading
import time

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python does not always export it


def log(message):
    print(f"[sg-helper] {message}", file=sys.stderr, flush=True)


def host_port(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text}")
    return host.strip("[]"), int(port)


def client_hello(server_name):
    """The ClientHello Python's TLS stack sends for `server_name` (TLS record bytes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    if not hello or hello[0] != 22:
        raise RuntimeError("ssl made no ClientHello")
    return hello


# ---------------------------------------------------------------- agent

def udp_echo_thread(address):
    """Answers each datagram with `<payload>|<sender port>` from the address it was sent to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind(address)

    def run():
        while True:
            data, ancillary, _, peer = sock.recvmsg(65535, socket.CMSG_SPACE(12))
            destination = None
            for level, kind, value in ancillary:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
                    destination = value[8:12]
            reply = data + b"|" + str(peer[1]).encode()
            cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("i4s4s", 0, destination, b"\0\0\0\0"))] if destination else []
            try:
                sock.sendmsg([reply], cmsg, 0, peer)
            except OSError as error:
                log(f"udp echo: cannot answer {peer}: {error}")

    threading.Thread(target=run, daemon=True).start()


async def tcp_echo(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def agent_main(args):
    if args.udp:
        udp_echo_thread(args.udp)
        log(f"agent: UDP echo on {args.udp[0]}:{args.udp[1]}")
    if args.tcp:
        server = await asyncio.start_server(tcp_echo, args.tcp[0], args.tcp[1], backlog=4096, reuse_address=True)
        log(f"agent: TCP echo on {args.tcp[0]}:{args.tcp[1]}")
    print("ready", flush=True)
    while True:
        await asyncio.sleep(3600)


# ---------------------------------------------------------------- prepare

def control_connection(host, port):
    """The Security Gateway's control endpoint speaks TLS (issue 14):
    SGCONTROL_CA names its certificate, the only one trusted (no name check,
    as the Connection Manager does); unset, the endpoint is plain HTTP."""
    ca = os.environ.get("SGCONTROL_CA")
    if not ca:
        return http.client.HTTPConnection(host, port, timeout=30)
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    return http.client.HTTPSConnection(host, port, timeout=30, context=context)


def prepare_main(args):
    grants = [line.strip() for line in open(args.grants) if line.strip()]
    host, port = args.control
    statuses = {}
    lock = threading.Lock()
    failures = []

    def worker(part):
        conn = control_connection(host, port)
        for token in part:
            body = json.dumps({"grant": token}).encode()
            for attempt in (0, 1):
                try:
                    conn.request("POST", "/v1/sessions", body=body, headers={"Content-Type": "application/json"})
                    reply = conn.getresponse()
                    answer = reply.read()
                    break
                except (http.client.HTTPException, ConnectionError):
                    conn.close()
                    conn = control_connection(host, port)
                    if attempt:
                        raise
            with lock:
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
                if reply.status != args.expect and len(failures) < 5:
                    failures.append(f"HTTP {reply.status}: {answer[:200]!r}")
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(grants[i::args.workers],)) for i in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    print(f"prepared={statuses.get(args.expect, 0)} total={len(grants)} seconds={elapsed:.2f} "
          f"per_s={len(grants) / elapsed:.0f} statuses={json.dumps(statuses, sort_keys=True)}", flush=True)
    for failure in failures:
        log(f"prepare: {failure}")
    return 0 if statuses.get(args.expect, 0) == len(grants) else 1


# ---------------------------------------------------------------- reach

def reach_main(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect((args.host, 9))
        return 0
    except ConnectionRefusedError:
        return 0  # the host answered with a reset: it is reachable
    except OSError:
        return 1
    finally:
        sock.close()


# ---------------------------------------------------------------- udp-ping

def udp_ping_main(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(args.bind)
    sock.settimeout(args.timeout)
    payload = args.payload.encode()
    for attempt in range(args.tries):
        sock.sendto(payload, args.to)
        try:
            data, peer = sock.recvfrom(65535)
        except socket.timeout:
            continue
        if args.expect_none:
            log(f"udp-ping: unexpected answer {data!r} from {peer}")
            return 1
        expected = payload + b"|" + str(args.expect_port).encode()
        if data == expected and peer == args.to:
            log(f"udp-ping: {args.bind[0]} -> {args.to[0]}:{args.to[1]}: answer {data.decode()!r} (agent saw source port {args.expect_port})")
            return 0
        log(f"udp-ping: answer {data!r} from {peer}, expected {expected!r} from {args.to}")
        return 1
    if args.expect_none:
        log(f"udp-ping: no answer to {args.bind[0]}, as expected")
        return 0
    log(f"udp-ping: no answer from {args.to} in {args.tries} tries")
    return 1


# ---------------------------------------------------------------- sessions

async def open_session(sg, source, hello, timeout):
    """Connects from `source`, sends `hello`, and reads it back. Returns (reader, writer) or raises."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(sg[0], sg[1], local_addr=(source, 0)), timeout)
    writer.write(hello)
    await writer.drain()
    echoed = await asyncio.wait_for(reader.readexactly(len(hello)), timeout)
    if echoed != hello:
        writer.close()
        raise RuntimeError("the agent echoed other bytes")
    return reader, writer


async def refused_session(sg, source, hello, timeout):
    """True when the gateway closes the connection without a byte (reset or end of stream)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(sg[0], sg[1], local_addr=(source, 0)), timeout)
    except (ConnectionError, OSError):
        return True  # refused before the handshake completed: also a refusal
    try:
        writer.write(hello)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1), timeout)
        return data == b""
    except (ConnectionError, OSError):
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        writer.close()


def udp_check(sources, sg, expect_port, timeout=2.0, tries=3):
    """One datagram from each source address; returns how many got the agent's answer via `expect_port`."""
    ok = 0
    for start in range(0, len(sources), 500):
        batch = sources[start:start + 500]
        poller = selectors.DefaultSelector()  # epoll: descriptors above 1024 are fine
        socks = {}
        for source in batch:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((source, 0))
            sock.setblocking(False)
            socks[source] = sock
            poller.register(sock, selectors.EVENT_READ, source)
        pending = set(batch)
        for _ in range(tries):
            for source in pending:
                try:
                    socks[source].sendto(f"u-{source}".encode(), sg)
                except OSError:
                    pass
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for key, _ in poller.select(0.05):
                    source = key.data
                    try:
                        data, peer = socks[source].recvfrom(65535)
                    except OSError:
                        continue
                    if source in pending and data == f"u-{source}|{expect_port}".encode() and peer == sg:
                        pending.discard(source)
                        ok += 1
            if not pending:
                break
        poller.close()
        for sock in socks.values():
            sock.close()
    return ok


async def sessions_main(args):
    first = ipaddress.IPv4Address(args.first_client)
    sources = [str(first + i) for i in range(args.count)]
    names = [args.sni.replace("{n}", str(i)) for i in range(args.count + 1)]
    started = time.monotonic()
    hellos = [client_hello(name) for name in names]
    log(f"sessions: {len(hellos)} ClientHellos made in {time.monotonic() - started:.1f}s ({len(hellos[0])} bytes each)")

    sessions = [None] * args.count
    errors = []
    semaphore = asyncio.Semaphore(args.parallel)

    async def one(i):
        async with semaphore:
            try:
                sessions[i] = await open_session(args.sg, sources[i], hellos[i], args.timeout)
            except Exception as error:  # noqa: BLE001 - every failure is reported by index
                errors.append(f"session {i} from {sources[i]} ({names[i]}): {type(error).__name__}: {error}")

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.count)))
    connect_seconds = time.monotonic() - started
    established = sum(1 for s in sessions if s is not None)
    log(f"sessions: {established}/{args.count} established (ClientHello relayed and echoed) in {connect_seconds:.1f}s")
    for error in errors[:5]:
        log(f"sessions: {error}")

    udp_ok = 0
    if args.expect_port:
        started = time.monotonic()
        udp_ok = await asyncio.get_running_loop().run_in_executor(None, udp_check, sources, args.sg, args.expect_port)
        log(f"sessions: UDP from {udp_ok}/{args.count} client addresses came back via source port {args.expect_port} "
            f"in {time.monotonic() - started:.1f}s")

    refused = None
    if args.expect_refused:
        extra = str(first + args.count)
        refused = await refused_session(args.sg, extra, hellos[args.count], args.timeout)
        log(f"sessions: one more session from {extra} ({names[args.count]}): {'refused' if refused else 'NOT refused'}")

    summary = {"established": established, "count": args.count, "udp_ok": udp_ok, "refused": refused,
               "connect_seconds": round(connect_seconds, 2)}
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            json.dump(summary, f)
        os.rename(args.ready_file + ".tmp", args.ready_file)
        deadline = time.monotonic() + args.hold_limit
        while not os.path.exists(args.release_file):
            if time.monotonic() > deadline:
                log("sessions: never released")
                return 1
            await asyncio.sleep(0.1)

    # Every session still carries bytes, then all close.
    alive = 0

    async def still(i):
        nonlocal alive
        if sessions[i] is None:
            return
        reader, writer = sessions[i]
        try:
            writer.write(b"still-there")
            await writer.drain()
            if await asyncio.wait_for(reader.readexactly(11), args.timeout) == b"still-there":
                alive += 1
        except Exception:  # noqa: BLE001
            pass

    await asyncio.gather(*(still(i) for i in range(args.count)))
    for s in sessions:
        if s is not None:
            s[1].close()
    log(f"sessions: {alive}/{established} still carried bytes at the end; all closed")
    good = established == args.count and alive == established
    if args.expect_port:
        good = good and udp_ok == args.count
    if args.expect_refused:
        good = good and refused
    print(json.dumps(dict(summary, alive=alive)), flush=True)
    return 0 if good else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("agent")
    a.add_argument("--tcp", type=host_port)
    a.add_argument("--udp", type=host_port)
    p = sub.add_parser("prepare")
    p.add_argument("--control", type=host_port, required=True)
    p.add_argument("--grants", required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--expect", type=int, default=201)
    r = sub.add_parser("reach")
    r.add_argument("host")
    u = sub.add_parser("udp-ping")
    u.add_argument("--bind", type=host_port, required=True)
    u.add_argument("--to", type=host_port, required=True)
    u.add_argument("--payload", default="ping")
    u.add_argument("--expect-port", type=int)
    u.add_argument("--expect-none", action="store_true")
    u.add_argument("--timeout", type=float, default=1.0)
    u.add_argument("--tries", type=int, default=3)
    s = sub.add_parser("sessions")
    s.add_argument("--sg", type=host_port, required=True)
    s.add_argument("--first-client", required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--sni", required=True, help="with {n}, the session's index")
    s.add_argument("--expect-port", type=int)
    s.add_argument("--expect-refused", action="store_true")
    s.add_argument("--parallel", type=int, default=256)
    s.add_argument("--timeout", type=float, default=20.0)
    s.add_argument("--ready-file")
    s.add_argument("--release-file")
    s.add_argument("--hold-limit", type=float, default=120.0)
    args = parser.parse_args()
    if args.command == "agent":
        if not args.tcp and not args.udp:
            parser.error("agent: give --tcp and/or --udp")
        asyncio.run(agent_main(args))
    elif args.command == "reach":
        sys.exit(reach_main(args))
    elif args.command == "prepare":
        sys.exit(prepare_main(args))
    elif args.command == "udp-ping":
        if args.expect_none == (args.expect_port is not None):
            parser.error("udp-ping: give exactly one of --expect-port and --expect-none")
        sys.exit(udp_ping_main(args))
    else:
        if bool(args.ready_file) != bool(args.release_file):
            parser.error("sessions: --ready-file and --release-file go together")
        sys.exit(asyncio.run(sessions_main(args)))


if __name__ == "__main__":
    main()
