#!/usr/bin/env python3
"""What one synced journal append costs on this disk, three ways.

  append     O_APPEND write + fdatasync: the file grows at every record, so
             each fdatasync also writes the inode (the journals before issue 15's
             zero fill)
  prezero    the file is first filled with zeros (written, synced); records
             overwrite them (what AppendOnlyFile does now, 64 KiB at a time)
  fallocate  the space is reserved with posix_fallocate (unwritten extents)

Prints p50/p99 of write + fdatasync and the process's CPU (user + system) per
append. Usage: taskset -c 1 Bench/journal-sync.py [--records N] [--dir DIR]
(DIR must be on the disk the state directories use; default /var/tmp).
"""
import argparse
import os
import resource
import time


def run(mode, directory, count, record):
    path = os.path.join(directory, f"journal-sync.{mode}.{os.getpid()}")
    if os.path.exists(path):
        os.unlink(path)
    try:
        if mode == "append":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            size = count * len(record) + 4096
            if mode == "prezero":
                os.write(fd, b"\0" * size)
            else:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        latencies = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(count):
            began = time.perf_counter()
            os.write(fd, record)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - began)
        after = resource.getrusage(resource.RUSAGE_SELF)
        os.close(fd)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    latencies.sort()
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / count * 1e6
    print(f"mode={mode} records={count} p50_us={latencies[count // 2] * 1e6:.1f} "
          f"p99_us={latencies[int(count * 0.99)] * 1e6:.1f} cpu_per_append_us={cpu:.1f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.records < 100:
        parser.error("--records: at least 100, to have a p99")
    record = b"x" * 200 + b"\n"
    for _ in range(args.rounds):
        for mode in ("append", "prezero", "fallocate"):
            run(mode, args.dir, args.records, record)


if __name__ == "__main__":
    main()
