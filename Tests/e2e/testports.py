"""Ports for the end-to-end scripts that must name a port before anything
listens on it (a daemon's config). A port the kernel hands out for port 0
comes from its ephemeral range, which an outgoing connection may take before
the daemon binds it: package-install's echo server lost its port that way
under `scripts/test --stress` ("Address already in use"). These come from
below that range, where only explicit binds land, at random, each once per
process, and are checked free for TCP and UDP on 127.0.0.1 (as TestPorts
does for the Swift tests, which run before these scripts, not beside them).

  python3 Tests/e2e/testports.py N   prints N such ports on one line
"""
import random
import socket
import sys

FIRST = 23000
_given = set()


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _is_free(port):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port():
    """A port free on 127.0.0.1 for both TCP and UDP at this moment, below the ephemeral range."""
    last = max(_ephemeral_low(), FIRST + 2000)
    for _ in range(2000):
        port = random.randrange(FIRST, last)
        if port not in _given and _is_free(port):
            _given.add(port)
            return port
    raise RuntimeError(f"testports: no free port in {FIRST}-{last - 1}")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    print(*(free_port() for _ in range(count)))
