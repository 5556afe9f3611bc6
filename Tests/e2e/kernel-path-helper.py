#!/usr/bin/env python3
"""Helper of Tests/e2e/kernel-path-netns.sh: signed control calls as the
broker would make them, echo checks through the gateway, long-lived flows
that report their progress, and a UDP echo server for the desktop.

  call  CONTROL GW_ID KEY_FILE METHOD PATH [JSON]   prints "STATUS BODY"
  tcp-echo HOST PORT         exit 0 when 64 random bytes come back (5 s)
  udp-echo HOST PORT         exit 0 when a datagram comes back (3 tries)
  hold HOST PORT FILE [udp]  one connection (or one UDP 5-tuple) kept busy:
                             a round trip every 100 ms, the count written to
                             FILE; "broken: WHY" there and exit 1 when it fails
  udp-server HOST PORT       echoes datagrams back to their sender
"""
import os
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "python"))
from leocontrol import ControlClient, read_key  # noqa: E402


def call(control, gateway_id, key_file, method, path, body=""):
    host, port = control.rsplit(":", 1)
    client = ControlClient(host, int(port), int(gateway_id), read_key(key_file))
    status, data = client.request(method, path, body.encode())
    print(status, data.decode(errors="replace"))


def tcp_echo(host, port):
    payload = os.urandom(64)
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(len(payload) - len(got))
                if not chunk:
                    break
                got += chunk
    except OSError as error:
        print(f"tcp-echo {host}:{port}: {error}", file=sys.stderr)
        return 1
    if got != payload:
        print(f"tcp-echo {host}:{port}: {len(got)} of {len(payload)} bytes came back", file=sys.stderr)
        return 1
    return 0


def udp_echo(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.connect((host, int(port)))
        for _ in range(3):
            payload = os.urandom(32)
            try:
                s.send(payload)
                while True:
                    if s.recv(2048) == payload:
                        return 0
            except OSError:
                continue
    print(f"udp-echo {host}:{port}: no echo", file=sys.stderr)
    return 1


def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def hold(host, port, path, kind="tcp"):
    count = 0
    try:
        if kind == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.connect((host, int(port)))
        else:
            s = socket.create_connection((host, int(port)), timeout=5)
        while True:
            payload = os.urandom(32)
            if kind == "udp":
                # A datagram may be lost; three in a row is a broken flow.
                for attempt in range(3):
                    s.send(payload)
                    try:
                        if s.recv(2048) == payload:
                            break
                    except socket.timeout:
                        if attempt == 2:
                            raise
            else:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(len(payload) - len(got))
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                if got != payload:
                    raise ConnectionError("wrong bytes")
            count += 1
            write(path, str(count))
            time.sleep(0.1)
    except OSError as error:
        write(path, f"broken: {error} after {count}")
        return 1


def udp_server(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, int(port)))
        while True:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    command, args = sys.argv[1], sys.argv[2:]
    if command == "call":
        call(*args)
        return 0
    handlers = {"tcp-echo": tcp_echo, "udp-echo": udp_echo, "hold": hold, "udp-server": udp_server}
    if command not in handlers:
        print(__doc__, file=sys.stderr)
        return 2
    return handlers[command](*args) or 0


if __name__ == "__main__":
    sys.exit(main())
