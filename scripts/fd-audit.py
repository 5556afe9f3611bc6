#!/usr/bin/env python3
"""scripts/fd-audit.py STRACE_OUTPUT BUILD_DIR: finds descriptors closed twice.

Reads the output of `strace -f -e trace=close,epoll_ctl,execve,clone,clone3`
(scripts/test --fd-audit) and reports, for every process that ran a
binary from BUILD_DIR (the test bundle, the daemons the tests start):
  - close() = -1 EBADF: a descriptor closed when it was no longer open, the
    visible half of a double close (the other half, when the number was
    reused meanwhile, closes somebody else's socket or file);
  - epoll_ctl() = -1 EBADF: an event loop finding its descriptor closed under it.
Children between fork and exec (posix_spawn closing what it inherited) and
programs not built here (openssl, python) are left out.
Exit status: 0 when nothing was found, 1 when something was (each listed), 2 on
bad input.
"""
import re
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: scripts/fd-audit.py STRACE_OUTPUT BUILD_DIR", file=sys.stderr)
        return 2
    path, build = sys.argv[1], sys.argv[2]
    try:
        lines = open(path, errors="replace").read().split("\n")
    except OSError as error:
        print(f"scripts/fd-audit.py: cannot read {path}: {error}", file=sys.stderr)
        return 2
    pending: dict[int, str] = {}
    events: list[tuple[int, str]] = []
    for line in lines:
        match = re.match(r"^(\d+) (.*)$", line)
        if not match:
            continue
        tid, rest = int(match.group(1)), match.group(2)
        if rest.endswith("<unfinished ...>"):
            pending[tid] = rest[: -len("<unfinished ...>")]
            continue
        resumed = re.match(r"^<\.\.\. (\w+) resumed>(.*)$", rest)
        if resumed:
            rest = pending.pop(tid, resumed.group(1) + "(") + resumed.group(2)
        events.append((tid, rest))
    # Threads belong to the process that cloned them (CLONE_THREAD).
    parent: dict[int, int] = {}
    for tid, text in events:
        match = re.match(r"^clone3?\((.*)\)\s*=\s*(\d+)", text)
        if match and "CLONE_THREAD" in match.group(1):
            parent[int(match.group(2))] = tid

    def process(tid: int) -> int:
        while tid in parent:
            tid = parent[tid]
        return tid

    watched: set[int] = set()
    program: dict[int, str] = {}
    findings: list[str] = []
    for tid, text in events:
        owner = process(tid)
        exec_match = re.match(r'^execve\("([^"]*)".*=\s*0', text)
        if exec_match:
            program[owner] = exec_match.group(1)
            if build in exec_match.group(1) or exec_match.group(1).startswith(".build"):
                watched.add(owner)
            else:
                watched.discard(owner)
            continue
        if owner not in watched or "EBADF" not in text:
            continue
        if text.startswith("close(") or text.startswith("epoll_ctl("):
            findings.append(f"{program.get(owner, '?')} (pid {owner}, thread {tid}): {' '.join(text.split())}")
    for finding in findings:
        print(f"scripts/fd-audit.py: {finding}")
    print(f"scripts/fd-audit.py: {len(findings)} descriptor(s) closed twice or closed under an event loop "
          f"in {len(watched)} process(es) of this build", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
