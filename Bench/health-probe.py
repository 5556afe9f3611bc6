#!/usr/bin/env python3
"""Bench/health-probe.py: GET /health on several endpoints, as a load
balancer's health check would (a new connection per check), and reports the
latency of each.

  health-probe.py --seconds S --interval MS [--bearer-file NAME=FILE] NAME=URL [NAME=URL ...]

One thread per endpoint sends a check every INTERVAL ms for S seconds (a
check that takes longer delays the next). A check is good when the answer
is 200; anything else, a refused connection or no answer within 10 s is a
failure. Output, one line per endpoint:

  name=NAME checks=N failures=F p50_ms=.. p99_ms=.. max_ms=..
"""
import argparse
import http.client
import os
import ssl
import sys
import threading
import time
import urllib.parse


def percentile(values, p):
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(p / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def probe(name, url, seconds, interval, headers, results):
    parts = urllib.parse.urlsplit(url)
    latencies, failures, reasons = [], 0, {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            if parts.scheme == "https":
                # The gateway's control endpoint: its own certificate (LEOCONTROL_CA) is the only trust.
                # The control endpoints' own certificates (gateway, Security Gateway) are the only trust.
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                for variable in ("LEOCONTROL_CA", "SGCONTROL_CA"):
                    if os.environ.get(variable):
                        context.load_verify_locations(cafile=os.environ[variable])
                connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10, context=context)
            else:
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            connection.request("GET", parts.path or "/health", headers=headers)
            response = connection.getresponse()
            response.read()
            connection.close()
            if response.status != 200:
                failures += 1
                reasons[str(response.status)] = reasons.get(str(response.status), 0) + 1
        except Exception as error:  # a refusal or a timeout is a failed check
            failures += 1
            reasons[type(error).__name__] = reasons.get(type(error).__name__, 0) + 1
        elapsed = time.monotonic() - started
        latencies.append(elapsed * 1000)
        pause = interval / 1000.0 - elapsed
        if pause > 0:
            time.sleep(pause)
    results[name] = (latencies, failures, reasons)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--interval", type=float, default=100, help="milliseconds between checks of one endpoint")
    parser.add_argument("--bearer-file", action="append", default=[],
                        help="NAME=FILE: send the token in FILE as a bearer to endpoint NAME")
    parser.add_argument("endpoints", nargs="+", help="NAME=URL")
    args = parser.parse_args()
    bearers = {}
    for item in args.bearer_file:
        name, path = item.split("=", 1)
        with open(path) as f:
            bearers[name] = {"Authorization": "Bearer " + f.read().strip()}
    results, threads = {}, []
    for item in args.endpoints:
        if "=" not in item:
            parser.error(f"{item}: expected NAME=URL")
        name, url = item.split("=", 1)
        thread = threading.Thread(target=probe, args=(name, url, args.seconds, args.interval, bearers.get(name, {}), results))
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    bad = False
    for item in args.endpoints:
        name = item.split("=", 1)[0]
        latencies, failures, reasons = results[name]
        why = ",".join(f"{k}:{v}" for k, v in sorted(reasons.items())) or "-"
        print(f"name={name} checks={len(latencies)} failures={failures} failure_kinds={why} "
              f"p50_ms={percentile(latencies, 50):.2f} p99_ms={percentile(latencies, 99):.2f} "
              f"max_ms={max(latencies):.2f}")
        bad = bad or not latencies
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
