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
bad input or when no process of BUILD_DIR is in the trace (nothing audited).
"""
import re
import sys


def main() -> int:
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    if len(sys.argv) != 3:
        print("usage: scripts/fd-audit.py STRACE_OUTPUT BUILD_DIR | --self-test", file=sys.stderr)
        return 2
    path, build = sys.argv[1], sys.argv[2]
    try:
        lines = open(path, errors="replace").read().split("\n")
    except OSError as error:
        print(f"scripts/fd-audit.py: cannot read {path}: {error}", file=sys.stderr)
        return 2
    findings, execs = audit(lines, build)
    for finding in findings:
        print(f"scripts/fd-audit.py: {finding}")
    print(f"scripts/fd-audit.py: {len(findings)} descriptor(s) closed twice or closed under an event loop "
          f"in {execs} process(es) of this build", file=sys.stderr)
    if execs == 0:
        # Nothing watched is not a pass: the trace, or its format, is not what this reads.
        print(f"scripts/fd-audit.py: no process of {build} in {path}: nothing was audited", file=sys.stderr)
        return 2
    return 1 if findings else 0


def audit(lines: list[str], build: str) -> tuple[list[str], int]:
    """The findings in strace output `lines`, and how many processes ran a binary of `build`."""
    pending: dict[int, str] = {}
    events: list[tuple[int, str]] = []
    for line in lines:
        # strace pads the task id to a width: "31013 close(" but "7451  close(".
        match = re.match(r"^(\d+)\s+(.*)$", line)
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
    return findings, execs


def self_test() -> int:
    """The audit on small traces of its own: it must find what it is for and
    nothing else (run by scripts/test, so the audit can be seen to fail)."""
    build = "/w/.build"
    bundle = 'execve("/w/.build/debug/t.xctest", ["t"], 0x0 /* 1 vars */) = 0'
    thread = "clone3({flags=CLONE_VM|CLONE_FILES|CLONE_THREAD, exit_signal=0} => {parent_tid=[101]}, 88) = 101"
    spawn = "clone3({flags=CLONE_VM|CLONE_VFORK, exit_signal=SIGCHLD}, 88) = 102"
    ebadf = "close(7)                          = -1 EBADF (Bad file descriptor)"
    cases = [
        # A thread of the test bundle closes a descriptor twice: found.
        ("double close in a thread", [f"100 {bundle}", f"100 {thread}", f"101 {ebadf}"], 1),
        # NIO finds its socket gone: found.
        ("epoll_ctl EBADF", [f"100 {bundle}", "100 epoll_ctl(20, EPOLL_CTL_DEL, 6, 0x1) = -1 EBADF (Bad file descriptor)"], 1),
        # posix_spawn's child closing what it inherited, then another program: not ours.
        ("spawned child", [f"100 {bundle}", f"100 {spawn}", f"102 {ebadf}", '102 execve("/usr/bin/openssl", ["o"], 0x0) = 0',
                           f"102 {ebadf}"], 0),
        # A thread id reused by a spawned program must not take the bundle out of the watch.
        ("reused task id", [f"100 {bundle}", f"100 {thread}", "101 +++ exited with 0 +++",
                            "100 clone3({flags=CLONE_VM|CLONE_VFORK, exit_signal=SIGCHLD}, 88) = 101",
                            '101 execve("/usr/bin/curl", ["c"], 0x0) = 0', f"101 {ebadf}", f"100 {ebadf}"], 1),
        # A call split across lines by another thread's output.
        ("unfinished and resumed", [f"100 {bundle}", "100 close(9 <unfinished ...>", "100 <... close resumed>) = -1 EBADF (Bad file descriptor)"], 1),
        # Programs not built here are not audited.
        ("other program", ['200 execve("/usr/bin/python3", ["p"], 0x0) = 0', f"200 {ebadf}"], 0),
        # A short task id padded by strace ("100   close(") is read as any other.
        ("padded task id", [f"100   {bundle}", f"100   {thread}", f"101   {ebadf}"], 1),
    ]
    failed = 0
    for name, lines, expected in cases:
        findings, execs = audit(lines, build)
        if len(findings) != expected or (expected and execs == 0):
            print(f"scripts/fd-audit.py --self-test: {name}: {len(findings)} finding(s), expected {expected}: {findings}", file=sys.stderr)
            failed += 1
    print(f"scripts/fd-audit.py --self-test: {len(cases) - failed} of {len(cases)} cases as expected", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
