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
    # Which process each event belongs to. Task ids are reused within a long
    # run (pid_max is often 32768), so a task id names one task from its first
    # event to its "+++ exited" line: a life. A life started by clone with
    # CLONE_THREAD belongs to the process of the life that cloned it; any
    # other life is a process of its own. The clone's return line may come
    # after the new task's first events, hence two passes.
    class Life:
        __slots__ = ("parent",)

        def __init__(self) -> None:
            self.parent: "Life | None" = None

    alive: dict[int, Life] = {}
    event_life: list[Life] = []
    for tid, text in events:
        life = alive.get(tid)
        if life is None:
            life = alive[tid] = Life()
        event_life.append(life)
        if text.startswith("+++ exited") or text.startswith("+++ killed"):
            alive.pop(tid, None)
            continue
        match = re.match(r"^clone3?\((.*)\)\s*=\s*(\d+)", text)
        if match and "CLONE_THREAD" in match.group(1):
            child = int(match.group(2))
            child_life = alive.get(child)
            if child_life is None:
                child_life = alive[child] = Life()
            child_life.parent = life

    def process(life: Life) -> Life:
        while life.parent is not None:
            life = life.parent
        return life

    watched: set[int] = set()            # id() of the root lives that run a binary of this build
    program: dict[int, str] = {}
    findings: list[str] = []
    execs = 0
    for (tid, text), life in zip(events, event_life):
        owner = id(process(life))
        exec_match = re.match(r'^execve\("([^"]*)".*=\s*0', text)
        if exec_match:
            program[owner] = exec_match.group(1)
            if build in exec_match.group(1) or exec_match.group(1).startswith(".build"):
                watched.add(owner)
                execs += 1
            else:
                watched.discard(owner)
            continue
        if owner not in watched or "EBADF" not in text:
            continue
        if text.startswith("close(") or text.startswith("epoll_ctl("):
            findings.append(f"{program.get(owner, '?')} (thread {tid}): {' '.join(text.split())}")
    for finding in findings:
        print(f"scripts/fd-audit.py: {finding}")
    print(f"scripts/fd-audit.py: {len(findings)} descriptor(s) closed twice or closed under an event loop "
          f"in {execs} process(es) of this build", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
