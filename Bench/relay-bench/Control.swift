import ControlProtocol
import Glibc
import SystemLayer

// The control plane's load, compiled (Bench/control-bench): the same
// scenarios as Bench/control-load.py's push-latency, rule-rate, fill and
// connect-rate, with the same output lines, on OS threads with blocking
// keep-alive connections (OpenSSL through SystemLayer's TLS client). The
// Python tool holds its interpreter's lock for every request it builds and
// parses: at 2,000-3,000 operations/s it used half of its CPU, so rates near
// the goals (10,000 rule operations/s, 1,000 connects/s) could not be told
// apart from its own limit.
//
//   relay-bench control-push  --control H:P --gateway-id N --key-file F --target H:P [--ca F]
//                             [--count 500] [--warmup 20] [--public-host 127.0.0.1]
//   relay-bench control-rate  (the same) [--seconds 5] [--workers 1] [--batch N]
//   relay-bench control-fill  (the same) [--count 2000]
//   relay-bench connect-rate  --broker H:P[,H:P...] --sid-file F --desktop-id N
//                             [--protocol echo] [--count 1000] [--workers 4]
//
// --ca names the control endpoint's certificate (the only one trusted, as the
// broker trusts it); without it the endpoint is taken to be plain HTTP.

/// Why a request failed, for the one line the tool prints before exiting 1.
struct LoadFailure: Error, CustomStringConvertible {
    let description: String
    /// A kept connection failed before any byte of the answer (the server
    /// closed it meanwhile): the request may go again on a new one.
    var beforeAnswer = false
}

/// One keep-alive HTTP/1.1 connection, TLS or plain, blocking.
final class KeepAliveHTTP {
    private let address: SocketAddress
    private let trust: TLSTrust?
    private let timeoutMilliseconds: Int32 = 30_000
    private var fd: FileDescriptor?
    private var tls: TLSClientSession?
    private var pending: [UInt8] = []
    private var readBuffer = [UInt8](repeating: 0, count: 65536)

    init(address: SocketAddress, trust: TLSTrust?) {
        self.address = address
        self.trust = trust
    }

    deinit { disconnect() }

    private func disconnect() {
        tls = nil
        fd?.close()
        fd = nil
        pending.removeAll(keepingCapacity: true)
    }

    private func connect() throws(LoadFailure) {
        let socket = try connectBlocking(to: address, timeoutMilliseconds: timeoutMilliseconds)
        if let trust {
            do { tls = try TLSClientSession(fd: socket, host: address.ip.description, trust: trust, timeoutMilliseconds: timeoutMilliseconds) } catch {
                socket.close()
                throw LoadFailure(description: "TLS with \(address): \(error)")
            }
        }
        fd = socket
    }

    private func send(_ bytes: [UInt8]) throws(LoadFailure) {
        guard let fd else { throw LoadFailure(description: "not connected") }
        if let tls {
            do { try tls.writeAll(bytes) } catch { throw LoadFailure(description: "sending to \(address): \(error)", beforeAnswer: true) }
            return
        }
        do { try fd.writeAll(bytes) } catch { throw LoadFailure(description: "sending to \(address): \(error)", beforeAnswer: true) }
    }

    /// Appends what arrives to `pending`; false at the end of the stream.
    private func receiveMore() throws(LoadFailure) -> Bool {
        if let tls {
            let chunk: [UInt8]
            do { chunk = try tls.read(maximum: 65536) } catch {
                throw LoadFailure(description: "reading from \(address): \(error)", beforeAnswer: pending.isEmpty)
            }
            pending.append(contentsOf: chunk)
            return !chunk.isEmpty
        }
        guard let fd else { throw LoadFailure(description: "not connected") }
        let got = readBuffer.withUnsafeMutableBytes { raw in Glibc.read(fd.rawValue, raw.baseAddress, raw.count) }
        if got < 0 { throw LoadFailure(description: "reading from \(address): \(Errno(rawValue: errno))", beforeAnswer: pending.isEmpty) }
        pending.append(contentsOf: readBuffer[0..<got])
        return got > 0
    }

    /// Sends one request and reads its answer; an idempotent request on a kept
    /// connection that closed before any byte of answer is sent once more on a new one.
    func request(_ method: String, _ path: String, headers: String = "", body: [UInt8] = []) throws(LoadFailure) -> (status: Int, body: [UInt8]) {
        var head = "\(method) \(path) HTTP/1.1\r\nHost: \(address)\r\n\(headers)"
        if !body.isEmpty || method == "POST" || method == "PUT" { head += "Content-Length: \(body.count)\r\n" }
        head += "\r\n"
        let outgoing = Array(head.utf8) + body
        let reused = fd != nil
        do {
            if fd == nil { try connect() }
            try send(outgoing)
            return try readAnswer()
        } catch {
            disconnect()
            // Not a POST: a connect the broker did take must not be made twice.
            guard reused, error.beforeAnswer, method != "POST" else { throw error }
            try connect()
            try send(outgoing)
            return try readAnswer()
        }
    }

    private func readAnswer() throws(LoadFailure) -> (status: Int, body: [UInt8]) {
        let separator: [UInt8] = [13, 10, 13, 10]
        var headEnd: Int?
        while headEnd == nil {
            if let found = find(separator, in: pending) { headEnd = found; break }
            guard try receiveMore() else {
                throw pending.isEmpty ? LoadFailure(description: "\(address) closed the connection before answering", beforeAnswer: true)
                    : LoadFailure(description: "\(address) closed in an answer's head")
            }
        }
        let end = headEnd!
        let head = String(decoding: pending[0..<end], as: UTF8.self)
        let lines = head.split(separator: "\r\n", omittingEmptySubsequences: false)
        let statusParts = lines[0].split(separator: " ")
        guard statusParts.count >= 2, statusParts[0].hasPrefix("HTTP/1."), let status = Int(statusParts[1]) else {
            throw LoadFailure(description: "\(address) answered no HTTP status line: \(lines[0].prefix(80))")
        }
        var length = 0
        var close = false
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingPrefix(" ")
            switch name {
            case "content-length":
                guard let n = Int(value) else { throw LoadFailure(description: "\(address): bad Content-Length \(value)") }
                length = n
            case "transfer-encoding":
                throw LoadFailure(description: "\(address) answered with Transfer-Encoding \(value); this tool reads Content-Length only")
            case "connection":
                close = value.lowercased() == "close"
            default: break
            }
        }
        let bodyStart = end + 4
        while pending.count < bodyStart + length {
            guard try receiveMore() else { throw LoadFailure(description: "\(address) closed in an answer's body") }
        }
        let body = Array(pending[bodyStart..<(bodyStart + length)])
        pending.removeFirst(bodyStart + length)
        if close { disconnect() }
        return (status, body)
    }

    private func find(_ needle: [UInt8], in haystack: [UInt8]) -> Int? {
        guard haystack.count >= needle.count else { return nil }
        var i = 0
        while i <= haystack.count - needle.count {
            if haystack[i] == needle[0] && haystack[i + 1] == needle[1] && haystack[i + 2] == needle[2] && haystack[i + 3] == needle[3] {
                return i
            }
            i += 1
        }
        return nil
    }
}

/// Signed requests to one gateway's control endpoint (broker-to-gateway).
final class ControlLoadClient {
    let http: KeepAliveHTTP
    let signer: ControlSigner

    init(_ setup: ControlSetup) {
        http = KeepAliveHTTP(address: setup.control, trust: setup.trust)
        signer = ControlSigner(gatewayID: setup.gatewayID, key: setup.key)
    }

    func signed(_ method: String, _ path: String, body: [UInt8] = []) throws(LoadFailure) -> (status: Int, body: [UInt8]) {
        var headers = "Authorization: " + signer.authorize(direction: .brokerToGateway, method: method, path: path, body: body) + "\r\n"
        if !body.isEmpty { headers += "Content-Type: application/json\r\n" }
        return try http.request(method, path, headers: headers, body: body)
    }

    /// PUTs a TCP rule (method 0) to `target`; returns the port the gateway answered.
    func putRule(_ id: String, target: String, extra: String) throws(LoadFailure) -> Int {
        let body = Array("{\"protocol\":\"tcp\",\"method\":0,\"target\":\"\(target)\"\(extra)}".utf8)
        let answer = try signed("PUT", "/control/v1/rules/\(id)", body: body)
        guard answer.status == 200 || answer.status == 201 else {
            throw LoadFailure(description: "PUT rule: HTTP \(answer.status): \(String(decoding: answer.body.prefix(200), as: UTF8.self))")
        }
        guard let port = jsonInteger("port", in: answer.body) else {
            throw LoadFailure(description: "PUT rule: no port in \(String(decoding: answer.body.prefix(200), as: UTF8.self))")
        }
        return port
    }

    func deleteRule(_ id: String) throws(LoadFailure) {
        let answer = try signed("DELETE", "/control/v1/rules/\(id)")
        guard answer.status == 204 else {
            throw LoadFailure(description: "DELETE rule: HTTP \(answer.status): \(String(decoding: answer.body.prefix(200), as: UTF8.self))")
        }
    }

    /// Puts TCP rules (method 0) to `target` in one batch (`POST /control/v1/rules`); every item must be created.
    func putBatch(_ ids: [String], target: String, extra: String) throws(LoadFailure) {
        let items = ids.map { "{\"id\":\"\($0)\",\"protocol\":\"tcp\",\"method\":0,\"target\":\"\(target)\"\(extra)}" }
        try batch(Array("{\"put\":[\(items.joined(separator: ","))]}".utf8), expecting: "\"status\":201", count: ids.count, what: "put")
    }

    /// Deletes rules in one batch; every item must be deleted.
    func deleteBatch(_ ids: [String]) throws(LoadFailure) {
        let list = ids.map { "\"\($0)\"" }.joined(separator: ",")
        try batch(Array("{\"delete\":[\(list)]}".utf8), expecting: "\"status\":204", count: ids.count, what: "delete")
    }

    private func batch(_ body: [UInt8], expecting marker: String, count: Int, what: String) throws(LoadFailure) {
        let answer = try signed("POST", "/control/v1/rules", body: body)
        let text = String(decoding: answer.body, as: UTF8.self)
        guard answer.status == 200, text.components(separatedBy: marker).count - 1 == count else {
            throw LoadFailure(description: "POST rules (\(what) batch of \(count)): HTTP \(answer.status): \(text.prefix(300))")
        }
    }

    /// The gateway's histogram of PUT handling times (its /metrics): cumulative counts by upper bound in seconds.
    func putHistogram() -> [Double: Double] {
        guard let answer = try? signed("GET", "/metrics"), answer.status == 200 else { return [:] }
        var buckets: [Double: Double] = [:]
        for line in String(decoding: answer.body, as: UTF8.self).split(separator: "\n") {
            guard line.hasPrefix("gateway_rule_push_duration_seconds_bucket{"), line.contains("method=\"PUT\""),
                  let le = line.split(separator: "le=\"", maxSplits: 1).last?.split(separator: "\"").first,
                  let count = line.split(separator: " ").last.flatMap({ Double($0) }) else { continue }
            buckets[le == "+Inf" ? Double.infinity : Double(le) ?? .nan] = count
        }
        return buckets
    }
}

/// What every control scenario needs, from the command line.
struct ControlSetup: Sendable {
    let control: SocketAddress
    let gatewayID: Int
    let key: ControlKey
    let trust: TLSTrust?
    let target: String
    let publicHost: IPAddress
    let extra: String

    static let optionNames: Set<String> = ["control", "gateway-id", "key-file", "target", "ca", "public-host", "forwarding-path"]

    init(_ options: Options) {
        control = options.address("control")
        let id = options.int("gateway-id", default: 0)
        guard id > 0 else { fail("--gateway-id is required (a positive integer)") }
        gatewayID = id
        let keyFile = options.required("key-file")
        guard let text = readText(keyFile) else { fail("--key-file: cannot read \(keyFile)") }
        do { key = try ControlKey(text: text) } catch { fail("--key-file \(keyFile): \(error)") }
        trust = options.string("ca").map { .caFile($0) }
        target = options.required("target")
        guard SocketAddress(target) != nil else { fail("--target: not a numeric HOST:PORT: \(target)") }
        let host = options.string("public-host") ?? "127.0.0.1"
        guard let ip = IPAddress(host) else { fail("--public-host: not a numeric address: \(host)") }
        publicHost = ip
        switch options.string("forwarding-path") {
        case nil: extra = ""
        case let path? where ["userspace", "kernel", "offload"].contains(path): extra = ",\"forwarding_path\":\"\(path)\""
        case let path?: fail("--forwarding-path wants userspace, kernel or offload, got \(path)")
        }
    }
}

/// A small file's text (a key, a session id), or nil when it cannot be read.
func readText(_ path: String) -> String? {
    guard let bytes = try? StateFile.read(path, limit: 1 << 16) else { return nil }
    return String(decoding: bytes, as: UTF8.self)
}

/// The integer after `"name":` in a JSON answer (the answers here are flat objects).
func jsonInteger(_ name: String, in body: [UInt8]) -> Int? {
    guard let value = jsonValueStart(name, in: body) else { return nil }
    var i = value
    var n = 0
    var digits = 0
    while i < body.count, body[i] >= 48, body[i] <= 57 {
        n = n * 10 + Int(body[i] - 48)
        i += 1
        digits += 1
    }
    return digits > 0 ? n : nil
}

/// The string after `"name":` (no escapes expected: ids are hex or UUIDs).
func jsonString(_ name: String, in body: [UInt8]) -> String? {
    guard let value = jsonValueStart(name, in: body), value < body.count, body[value] == UInt8(ascii: "\"") else { return nil }
    guard let close = body[(value + 1)...].firstIndex(of: UInt8(ascii: "\"")) else { return nil }
    return String(decoding: body[(value + 1)..<close], as: UTF8.self)
}

private func jsonValueStart(_ name: String, in body: [UInt8]) -> Int? {
    let key = Array("\"\(name)\"".utf8)
    guard body.count >= key.count else { return nil }
    var i = 0
    while i <= body.count - key.count {
        if body[i] == key[0], Array(body[i..<(i + key.count)]) == key {
            var j = i + key.count
            while j < body.count, body[j] == 32 { j += 1 }
            guard j < body.count, body[j] == UInt8(ascii: ":") else { i += 1; continue }
            j += 1
            while j < body.count, body[j] == 32 { j += 1 }
            return j
        }
        i += 1
    }
    return nil
}

func randomRuleID() -> String { ControlCrypto.hex(ControlCrypto.randomBytes(16)) }

/// A connected TCP socket to `address`, blocking, with TCP_NODELAY.
func connectBlocking(to address: SocketAddress, timeoutMilliseconds: Int32) throws(LoadFailure) -> FileDescriptor {
    let fd: FileDescriptor
    do { fd = try Socket.makeTCP(family: address.family) } catch { throw LoadFailure(description: "cannot open a socket: \(error)") }
    do throws(Errno) {
        if case .inProgress = try Socket.connect(fd, to: address) {
            guard BlockingWait.writable(fd, timeoutMilliseconds: timeoutMilliseconds) else { throw Errno(rawValue: ETIMEDOUT) }
            if let error = Socket.pendingError(fd) { throw error }
        }
    } catch {
        fd.close()
        throw LoadFailure(description: "cannot connect to \(address): \(error)")
    }
    Socket.setNoDelay(fd)
    let flags = fcntl(fd.rawValue, F_GETFL)
    _ = fcntl(fd.rawValue, F_SETFL, flags & ~O_NONBLOCK)
    return fd
}

/// A TCP connection to `address` that completes a 64-byte echo (blocking).
func echoThrough(_ address: SocketAddress, size: Int = 64) throws(LoadFailure) {
    let fd: FileDescriptor
    do { fd = try connectBlocking(to: address, timeoutMilliseconds: 10_000) } catch {
        throw LoadFailure(description: "echo through \(address): \(error)")
    }
    defer { fd.close() }
    var payload = [UInt8](repeating: 0, count: size)
    for i in 0..<size { payload[i] = payloadByte(i &+ Int(truncatingIfNeeded: nowNs())) }
    do { try fd.writeAll(payload) } catch { throw LoadFailure(description: "echo through \(address): \(error)") }
    var got = [UInt8](repeating: 0, count: size)
    var have = 0
    while have < size {
        let n = got.withUnsafeMutableBytes { Glibc.read(fd.rawValue, $0.baseAddress! + have, size - have) }
        if n < 0 { throw LoadFailure(description: "echo through \(address): \(Errno(rawValue: errno))") }
        if n == 0 { throw LoadFailure(description: "echo through \(address): closed after \(have) of \(size) bytes") }
        have += n
    }
    guard got == payload else { throw LoadFailure(description: "echo through \(address): wrong bytes") }
}

private func milliseconds(_ sorted: [Double], _ p: Double) -> String { fixed(percentile(sorted, p), 3) }

private func exitFailing(_ scenario: String, _ error: LoadFailure) -> Never {
    note("error: \(scenario): \(error)")
    exit(1)
}

func runControlPush(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ControlSetup.optionNames.union(["count", "warmup", "samples"]))
    let setup = ControlSetup(options)
    let count = max(1, options.int("count", default: 500))
    // --samples FILE: each sample's start (monotonic ms), PUT and first-use ms, to find what a slow one met.
    let samplesFile = options.string("samples")
    var timeline: [String] = []
    let warmup = options.int("warmup", default: 20)
    ignoreSigpipe()
    let client = ControlLoadClient(setup)
    var samples: [Double] = []
    samples.reserveCapacity(count)
    // The two parts of each sample: the PUT's round trip, then the first use (connect + echo).
    var putSamples: [Double] = [], useSamples: [Double] = []
    var before: [Double: Double] = [:]
    do throws(LoadFailure) {
        for i in 0..<(warmup + count) {
            if i == warmup { before = client.putHistogram() }
            let id = randomRuleID()
            let start = nowNs()
            let port = try client.putRule(id, target: setup.target, extra: setup.extra)
            let answered = nowNs()
            try echoThrough(SocketAddress(ip: setup.publicHost, port: UInt16(port)))
            let end = nowNs()
            if i >= warmup {
                samples.append(Double(end - start) / 1e6)
                putSamples.append(Double(answered - start) / 1e6)
                useSamples.append(Double(end - answered) / 1e6)
                if samplesFile != nil {
                    timeline.append("\(fixed(Double(start) / 1e6, 3)) \(fixed(Double(answered - start) / 1e6, 3)) \(fixed(Double(end - answered) / 1e6, 3))")
                }
            }
            try client.deleteRule(id)
        }
    } catch {
        exitFailing("push-latency", error)
    }
    if let samplesFile {
        let text = "start_ms put_ms use_ms\n" + timeline.joined(separator: "\n") + "\n"
        do throws(Errno) { try StateFile.writeAtomically(samplesFile, Array(text.utf8), durable: false) } catch { fail("cannot write \(samplesFile): \(error)") }
    }
    let after = client.putHistogram()
    var server = "server_within_1ms=nan server_p99_le_ms=nan"
    let delta = after.reduce(into: [Double: Double]()) { $0[$1.key] = $1.value - (before[$1.key] ?? 0) }
    if let total = delta[.infinity], total > 0 {
        let within = (delta[0.001] ?? 0) / total
        let p99 = delta.filter { $0.value >= 0.99 * total }.keys.min() ?? .infinity
        server = "server_within_1ms=\(fixed(within, 4)) server_p99_le_ms=\(p99 * 1000)"
    }
    let sorted = samples.sorted()
    print("scenario=push-latency count=\(sorted.count) p50_ms=\(milliseconds(sorted, 50)) p99_ms=\(milliseconds(sorted, 99)) "
        + "mean_ms=\(fixed(sorted.reduce(0, +) / Double(sorted.count), 3)) max_ms=\(fixed(sorted.last ?? 0, 3)) \(server) "
        + "put_p50_ms=\(milliseconds(putSamples.sorted(), 50)) put_p99_ms=\(milliseconds(putSamples.sorted(), 99)) "
        + "use_p50_ms=\(milliseconds(useSamples.sorted(), 50)) use_p99_ms=\(milliseconds(useSamples.sorted(), 99))")
    exit(0)
}

func runControlFill(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ControlSetup.optionNames.union(["count"]))
    let setup = ControlSetup(options)
    let count = max(1, options.int("count", default: 2000))
    ignoreSigpipe()
    let client = ControlLoadClient(setup)
    let start = nowNs()
    do throws(LoadFailure) {
        for i in 0..<count {
            _ = try client.putRule("fill-\(i)", target: setup.target, extra: setup.extra + ",\"unused_expiry_s\":604800")
        }
    } catch {
        exitFailing("fill", error)
    }
    let seconds = Double(nowNs() - start) / 1e9
    print("scenario=fill count=\(count) seconds=\(fixed(seconds, 2)) rules_per_s=\(Int(Double(count) / seconds))")
    exit(0)
}

/// Each thread's outcome, written only by that thread until the join.
private final class LoadBoard: @unchecked Sendable {
    var counts: [Int]
    var samples: [[Double]]
    var extras: [[String]]
    var errors: [String?]
    init(_ n: Int) {
        counts = Array(repeating: 0, count: n)
        samples = Array(repeating: [], count: n)
        extras = Array(repeating: [], count: n)
        errors = Array(repeating: nil, count: n)
    }
    var firstError: String? { errors.compactMap { $0 }.first }
}

private func runThreads(_ n: Int, _ name: String, _ body: @escaping @Sendable (Int) -> Void) -> Double {
    let start = nowNs()
    var handles: [ThreadHandle] = []
    for i in 0..<n {
        do { handles.append(try SystemThread.spawn(name: "\(name)-\(i)") { body(i) }) } catch { fail("cannot start a thread: \(error)") }
    }
    for handle in handles { handle.join() }
    return Double(nowNs() - start) / 1e9
}

func runControlRate(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ControlSetup.optionNames.union(["seconds", "workers", "batch"]))
    let setup = ControlSetup(options)
    let seconds = options.double("seconds", default: 5)
    let workers = max(1, options.int("workers", default: 1))
    // 0: one PUT and one DELETE per rule; N: N puts in one POST, then N deletes in another.
    let batch = options.int("batch", default: 0)
    guard seconds > 0 else { fail("--seconds must be > 0") }
    guard (0...256).contains(batch) else { fail("--batch must be 0 (single calls) to 256") }
    ignoreSigpipe()
    let board = LoadBoard(workers)
    let stop = nowNs() + UInt64(seconds * 1e9)
    let elapsed = runThreads(workers, "rule-rate") { i in
        let client = ControlLoadClient(setup)
        do throws(LoadFailure) {
            while nowNs() < stop {
                if batch == 0 {
                    let id = randomRuleID()
                    _ = try client.putRule(id, target: setup.target, extra: setup.extra)
                    try client.deleteRule(id)
                    board.counts[i] += 2
                } else {
                    let ids = (0..<batch).map { _ in randomRuleID() }
                    try client.putBatch(ids, target: setup.target, extra: setup.extra)
                    try client.deleteBatch(ids)
                    board.counts[i] += 2 * batch
                }
            }
        } catch {
            board.errors[i] = error.description
        }
    }
    if let error = board.firstError { note("error: rule-rate: \(error)"); exit(1) }
    let ops = board.counts.reduce(0, +)
    let requests = batch == 0 ? ops : ops / batch
    print("scenario=rule-rate workers=\(workers) batch=\(batch) seconds=\(fixed(elapsed, 2)) ops=\(ops) "
        + "ops_per_s=\(Int(Double(ops) / elapsed)) pairs_per_s=\(Int(Double(ops) / 2 / elapsed)) "
        + "requests_per_s=\(Int(Double(requests) / elapsed))")
    exit(0)
}

/// A counter that threads take from until it runs out.
private final class Remaining: @unchecked Sendable {
    private let lock = BlockingMutex(0)
    init(_ n: Int) { lock.withLock { $0 = n } }
    func take() -> Bool { lock.withLock { if $0 <= 0 { return false }; $0 -= 1; return true } }
}

func runConnectRate(_ arguments: ArraySlice<String>) -> Never {
    let options = Options(arguments, allowed: ["broker", "sid-file", "desktop-id", "protocol", "count", "workers"])
    let brokers = options.required("broker").split(separator: ",").map { text -> SocketAddress in
        guard let address = SocketAddress(String(text)) else { fail("--broker: not a numeric HOST:PORT: \(text)") }
        return address
    }
    let sidFile = options.required("sid-file")
    guard let sidText = readText(sidFile) else { fail("--sid-file: cannot read \(sidFile)") }
    let sid = ControlCrypto.trimmingWhitespace(sidText)
    let desktop = options.int("desktop-id", default: 0)
    guard desktop > 0 else { fail("--desktop-id is required (a positive integer)") }
    let protocolName = options.string("protocol") ?? "echo"
    let count = max(1, options.int("count", default: 1000))
    let workers = max(1, options.int("workers", default: 4))
    ignoreSigpipe()
    let headers = "Authorization: Bearer \(sid)\r\nContent-Type: application/json\r\n"
    let body = Array("{\"desktop_id\":\(desktop),\"protocol\":\"\(protocolName)\"}".utf8)
    let remaining = Remaining(count)
    let connects = LoadBoard(workers)
    let connectSeconds = runThreads(workers, "connect") { i in
        let http = KeepAliveHTTP(address: brokers[i % brokers.count], trust: nil)
        do throws(LoadFailure) {
            while remaining.take() {
                let start = nowNs()
                let answer = try http.request("POST", "/v1/connect", headers: headers, body: body)
                guard answer.status == 200 else {
                    throw LoadFailure(description: "POST /v1/connect: HTTP \(answer.status): \(String(decoding: answer.body.prefix(200), as: UTF8.self))")
                }
                connects.samples[i].append(Double(nowNs() - start) / 1e6)
                guard let rule = jsonString("rule_id", in: answer.body) else {
                    throw LoadFailure(description: "POST /v1/connect: no rule_id in \(String(decoding: answer.body.prefix(200), as: UTF8.self))")
                }
                connects.extras[i].append(rule)
            }
        } catch {
            connects.errors[i] = error.description
        }
    }
    if let error = connects.firstError { note("error: connect-rate: \(error)"); exit(1) }
    let deletes = LoadBoard(workers)
    let disconnectSeconds = runThreads(workers, "disconnect") { i in
        let http = KeepAliveHTTP(address: brokers[i % brokers.count], trust: nil)
        do throws(LoadFailure) {
            for rule in connects.extras[i] {
                let start = nowNs()
                let answer = try http.request("DELETE", "/v1/connect/\(rule)", headers: headers)
                guard answer.status == 204 else {
                    throw LoadFailure(description: "DELETE /v1/connect: HTTP \(answer.status): \(String(decoding: answer.body.prefix(200), as: UTF8.self))")
                }
                deletes.samples[i].append(Double(nowNs() - start) / 1e6)
            }
        } catch {
            deletes.errors[i] = error.description
        }
    }
    if let error = deletes.firstError { note("error: connect-rate: \(error)"); exit(1) }
    let connectMs = connects.samples.flatMap { $0 }.sorted()
    let deleteMs = deletes.samples.flatMap { $0 }.sorted()
    print("scenario=connect-rate workers=\(workers) brokers=\(brokers.count) count=\(connectMs.count) "
        + "connect_per_s=\(Int(Double(connectMs.count) / connectSeconds)) connect_p50_ms=\(fixed(percentile(connectMs, 50), 2)) "
        + "connect_p99_ms=\(fixed(percentile(connectMs, 99), 2)) "
        + "disconnect_per_s=\(Int(Double(deleteMs.count) / disconnectSeconds)) disconnect_p50_ms=\(fixed(percentile(deleteMs, 50), 2)) "
        + "disconnect_p99_ms=\(fixed(percentile(deleteMs, 99), 2))")
    exit(0)
}
