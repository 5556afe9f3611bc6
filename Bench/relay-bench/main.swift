// relay-bench: the load generator and echo server behind Bench/run.
//
//   relay-bench echo --listen HOST:PORT[,HOST:PORT...]
//   relay-bench connrate --target HOST:PORT --concurrency N --duration SECONDS --size BYTES
//                        [--threads T] [--warmup SECONDS] [--timeout SECONDS]
//   relay-bench hold --target HOST:PORT --count N --pid PID[,PID...]
//                    [--parallel P] [--settle SECONDS] [--verify yes|no] [--message-size BYTES]
//   relay-bench udpecho --listen HOST:PORT[,HOST:PORT...]
//   relay-bench udpflood --target HOST:PORT --sink HOST:PORT [--size 64] [--duration 5] [--warmup 0.5] [--batch 32]
//   relay-bench udpping --target HOST:PORT [--size 64] [--duration 5] [--warmup 0.5] [--timeout 1000]
//   relay-bench kernel-rules --table NAME [--present 2000] [--count 1000]   (root: nftables)
//   relay-bench control-push | control-rate | control-fill | connect-rate   (Control.swift)
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
      relay-bench udpecho --listen HOST:PORT[,HOST:PORT...]
      relay-bench udpflood --target HOST:PORT --sink HOST:PORT [--size 64] [--duration 5] [--warmup 0.5] [--batch 32]
      relay-bench udpping --target HOST:PORT [--size 64] [--duration 5] [--warmup 0.5] [--timeout 1000]
      relay-bench kernel-rules --table NAME [--present 2000] [--count 1000]
      relay-bench control-push --control HOST:PORT --gateway-id N --key-file F --target HOST:PORT [--ca F]
                               [--count 500] [--warmup 20] [--public-host 127.0.0.1] [--forwarding-path P]
      relay-bench control-rate (the same options) [--seconds 5] [--workers 1] [--batch N]
      relay-bench control-fill (the same options) [--count 2000]
      relay-bench connect-rate --broker HOST:PORT[,HOST:PORT...] --sid-file F --desktop-id N
                               [--protocol echo] [--count 1000] [--workers 4]
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
case "udpecho": runUDPEcho(rest)
case "udpflood": runUDPFlood(rest)
case "udpping": runUDPPing(rest)
case "kernel-rules": runKernelRules(rest)
case "control-push": runControlPush(rest)
case "control-rate": runControlRate(rest)
case "control-fill": runControlFill(rest)
case "connect-rate": runConnectRate(rest)
case "-h", "--help", "help":
    print(usage)
    exit(0)
default:
    fail("unknown subcommand \(arguments[1])\n\(usage)")
}
