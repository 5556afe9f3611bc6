#!/usr/bin/env python3
"""Bench/rss-map.py PID: a process's resident memory by mapping, largest first.

Sums Rss, Anonymous and Private_Dirty of /proc/PID/smaps per mapped file
([heap], [stack] and unnamed anonymous mappings each under their own name),
so a benchmark can say which part of RSS is the binary, which the shared
libraries and which the heap.
"""
import collections
import sys


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: Bench/rss-map.py PID", file=sys.stderr)
        return 2
    rss, anon = collections.Counter(), collections.Counter()
    name = "[anon]"
    try:
        with open(f"/proc/{sys.argv[1]}/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if not fields:
                    continue
                if not fields[0].endswith(":"):          # a mapping's header line
                    name = fields[5] if len(fields) > 5 else "[anon]"
                elif fields[0] == "Rss:":
                    rss[name] += int(fields[1])
                elif fields[0] == "Anonymous:":
                    anon[name] += int(fields[1])
    except OSError as error:
        print(f"Bench/rss-map.py: cannot read /proc/{sys.argv[1]}/smaps: {error}", file=sys.stderr)
        return 1
    print(f"{'rss_kb':>8} {'anon_kb':>8} mapping")
    for mapping, kb in rss.most_common():
        if kb:
            print(f"{kb:8d} {anon[mapping]:8d} {mapping}")
    print(f"{sum(rss.values()):8d} {sum(anon.values()):8d} total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
