import Foundation
import Glibc
import Synchronization
import SystemLayer
import Testing
import TestSupport

/// The journal file's group commit: threads that append and wait at once
/// share fdatasyncs, and every append is in the file when its wait returns.
@Suite("Append-only file", .offPool)
struct AppendOnlyFileTests {
    @Test("appends from 8 threads, each waiting for its own, are all there and whole")
    func groupCommit() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("aof-\(UInt64.random(in: 0...UInt64.max))").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let file = try AppendOnlyFile(path: folder + "/journal")
        let failures = Mutex<[String]>([])
        let threads = 8, perThread = 50
        let done = DispatchGroup()
        for t in 0..<threads {
            done.enter()
            Thread {
                defer { done.leave() }
                for i in 0..<perThread {
                    do {
                        try file.append(Array("\(t) \(i)\n".utf8)).makeDurable()
                    } catch {
                        failures.withLock { $0.append("\(t) \(i): \(error)") }
                    }
                }
            }.start()
        }
        done.wait()
        #expect(failures.withLock { $0 }.isEmpty)
        let lines = try String(contentsOfFile: folder + "/journal", encoding: .utf8).split(separator: "\n")
        #expect(lines.count == threads * perThread)
        #expect(Set(lines).count == threads * perThread, "a record was torn or written twice")
        // A sequence already covered returns at once.
        try file.sync(through: 1)
    }
}
