// relay-bench: the load generator and echo server behind Bench/run.
//
//   relay-bench echo --listen HOST:PORT[,HOST:PORT...]
//   relay-bench connrate --target HOST:PORT --concurrency N --duration SECONDS --size BYTES
//                        [--threads T] [--warmup SECONDS] [--timeout SECONDS]
//   relay-bench hold --target HOST:PORT --count N --pid PID[,PID...]
//                    [--parallel P] [--settle SECONDS] [--verify yes|no] [--message-size BYTES]
//
// Each measuring subcommand prints one `key=value ...` line on stdout;
// progress and errors go to stderr.
import Glibc

let usage = """
    usage:
      relay-bench echo --listen HOST:PORT[,HOST:PORT...]
      relay-bench connrate --target HOST:PORT [--concurrency 64] [--duration 10] [--size 64]
                           [--threads 1] [--warmup 0.5] [--timeout 10]
      relay-bench hold --target HOST:PORT --count N --pid PID[,PID...]
                       [--parallel 32] [--settle 2] [--verify yes|no] [--message-size 32]
    """

let arguments = CommandLine.arguments
guard arguments.count >= 2 else {
    print(usage)
    exit(2)
}
let rest = arguments.dropFirst(2)
switch arguments[1] {
case "echo": runEcho(rest)
case "connrate": runConnRate(rest)
case "hold": runHold(rest)
case "-h", "--help", "help":
    print(usage)
    exit(0)
default:
    fail("unknown subcommand \(arguments[1])\n\(usage)")
}
