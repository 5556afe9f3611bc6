import Glibc
import NetfilterKernel
import SystemLayer

/// `kernel-rules --table NAME [--present 2000] [--count 1000]`: the kernel
/// path's rule install cost through libnftnl/libmnl, in the calling
/// process's network namespace (Bench/kernel-bench runs it in a namespace
/// of its own). Makes table inet NAME, installs `present` forwards one batch
/// each (rules/s), then times `count` more single-forward installs and
/// their removals with those present (p50/p99 in microseconds), and one
/// batch of `present` at once; deletes the table at the end.
func runKernelRules(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["table", "present", "count"])
    let table = KernelTable(name: options.required("table"))
    let present = options.int("present", default: 2000)
    let count = options.int("count", default: 1000)
    let publicAddress = IPAddress("198.18.0.1")!
    func forward(_ i: Int, base: Int) -> KernelForward {
        KernelForward(client: i % 2 == 0 ? nil : IPAddress.v4(0xC633_6400 | UInt32(i % 250 + 1)), publicAddress: publicAddress,
                      transport: i % 3 == 0 ? .udp : .tcp, port: UInt16(base + i), target: SocketAddress(ip: .v4(0x0A01_0000 | UInt32(i)), port: 3389))
    }
    do throws(NetfilterError) {
        try table.replace(publics: [publicAddress], forwards: [])
        var start = nowNs()
        for i in 0..<present { try table.apply([.add(forward(i, base: 10_000), timeoutMilliseconds: 300_000)]) }
        let fillSeconds = Double(nowNs() - start) / 1e9
        var adds: [UInt32] = [], removes: [UInt32] = []
        adds.reserveCapacity(count)
        removes.reserveCapacity(count)
        for i in 0..<count {
            let f = forward(i, base: 40_000)
            let t0 = nowNs()
            try table.apply([.add(f, timeoutMilliseconds: 300_000)])
            let t1 = nowNs()
            try table.apply([.remove(f)])
            let t2 = nowNs()
            adds.append(UInt32(min(t1 - t0, UInt64(UInt32.max))))
            removes.append(UInt32(min(t2 - t1, UInt64(UInt32.max))))
        }
        adds.sort()
        removes.sort()
        let held = try table.forwards().count
        start = nowNs()
        try table.apply((0..<present).map { .add(forward($0, base: 25_000), timeoutMilliseconds: nil) })
        let batchSeconds = Double(nowNs() - start) / 1e9
        start = nowNs()
        let dumped = try table.forwards().count
        let dumpSeconds = Double(nowNs() - start) / 1e9
        try table.delete()
        func us(_ ns: UInt32) -> String { fixed(Double(ns) / 1000, 1) }
        print("present=\(held) fill_rules_per_s=\(fixed(Double(present) / fillSeconds, 0)) "
            + "add_p50_us=\(us(percentile(adds, 50))) add_p99_us=\(us(percentile(adds, 99))) add_max_us=\(us(adds.last ?? 0)) "
            + "remove_p50_us=\(us(percentile(removes, 50))) remove_p99_us=\(us(percentile(removes, 99))) "
            + "batch_of_\(present)_ms=\(fixed(batchSeconds * 1000, 1)) dump_of_\(dumped)_ms=\(fixed(dumpSeconds * 1000, 1)) count=\(count)")
        exit(0)
    } catch {
        _ = try? table.delete()
        fail("kernel-rules: \(error)")
    }
}
