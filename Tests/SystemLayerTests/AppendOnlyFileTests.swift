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
    /// A fresh folder for one test's journal (the caller removes it).
    static func makeFolder() throws -> String {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("aof-\(UInt64.random(in: 0...UInt64.max))").path
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        return folder
    }

    @Test("appends from 8 threads, each waiting for its own, are all there and whole")
    func groupCommit() throws {
        let folder = try Self.makeFolder()
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
        let bytes = try #require(try StateFile.read(folder + "/journal"))
        let lines = String(decoding: AppendOnlyFile.records(in: bytes), as: UTF8.self).split(separator: "\n")
        #expect(lines.count == threads * perThread)
        #expect(Set(lines).count == threads * perThread, "a record was torn or written twice")
        // A sequence already covered returns at once.
        try file.sync(through: 1)
    }

    @Test("records overwrite zeros written ahead; a reopened file continues after its last record; the readers' view stops at the first zero")
    func filledAhead() throws {
        let folder = try Self.makeFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let path = folder + "/journal"
        func contents() throws -> [UInt8] { try #require(try StateFile.read(path)) }

        let file = try AppendOnlyFile(path: path)
        try file.append(Array("one\n".utf8)).makeDurable()
        var bytes = try contents()
        #expect(bytes.count == 64 << 10, "the first fill is 64 KiB")
        #expect(Array(AppendOnlyFile.records(in: bytes)) == Array("one\n".utf8))
        #expect(bytes[4...].allSatisfy { $0 == 0 })

        // A record larger than what is filled: the fill covers it, rounded to a page.
        let big = [UInt8](repeating: UInt8(ascii: "b"), count: 100_000) + [UInt8(ascii: "\n")]
        try file.append(big).makeDurable()
        bytes = try contents()
        let most: Int = 4 + big.count + (64 << 10) + 4096
        #expect(bytes.count >= 4 + big.count && bytes.count % 4096 == 0 && bytes.count <= most, "\(bytes.count)")
        #expect(Array(AppendOnlyFile.records(in: bytes)) == Array("one\n".utf8) + big)

        // Another instance (a restart, or the journal reopened after a rename) appends after the last record, not at the file's end.
        let size = bytes.count
        let again = try AppendOnlyFile(path: path)
        try again.append(Array("two\n".utf8)).makeDurable()
        bytes = try contents()
        #expect(bytes.count == size, "no new fill while the zeros last")
        #expect(Array(AppendOnlyFile.records(in: bytes)) == Array("one\n".utf8) + big + Array("two\n".utf8))

        // A file written whole elsewhere (a snapshot, no zeros): appends follow it.
        try StateFile.writeAtomically(path, Array("snap\n".utf8), mode: 0o600)
        let snapshot = try AppendOnlyFile(path: path)
        try snapshot.append(Array("next\n".utf8)).makeDurable()
        #expect(Array(AppendOnlyFile.records(in: try contents())) == Array("snap\nnext\n".utf8))

        // An empty file, and one that is only zeros.
        #expect(AppendOnlyFile.records(in: []).isEmpty && AppendOnlyFile.records(in: [0, 0, 0]).isEmpty)
        var info = stat()
        #expect(stat(path, &info) == 0 && info.st_mode & 0o777 == 0o600)
    }

    @Test("the zeros come 64 KiB at a time, and each fill is made durable with the next record")
    func fillSteps() throws {
        let folder = try Self.makeFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let path = folder + "/journal"
        let file = try AppendOnlyFile(path: path)
        let record = [UInt8](repeating: UInt8(ascii: "r"), count: 4095) + [UInt8(ascii: "\n")]
        var sizes: [Int] = []
        for n in 1...64 {
            try file.append(record).makeDurable()
            var info = stat()
            #expect(stat(path, &info) == 0)
            #expect(Int(info.st_size) >= n * 4096)
            if sizes.last != Int(info.st_size) { sizes.append(Int(info.st_size)) }
        }
        let expected: [Int] = [1, 2, 3, 4].map { $0 * (64 << 10) }
        #expect(sizes == expected, "\(sizes)")
        let bytes = try #require(try StateFile.read(path, limit: 1 << 30))
        #expect(AppendOnlyFile.records(in: bytes).count == 64 * 4096)
    }
}

/// `rules_sync = background`: appends answered before their sync are made
/// durable by a thread of its own, one fdatasync per file for what waits.
@Suite("Background sync", .offPool)
struct BackgroundSyncTests {
    @Test("appends to two files requested from 4 threads are all made durable without anyone waiting; flush returns once they are",
          arguments: [UInt32(0), 2_000])
    func syncsWhatIsRequested(gatherMicroseconds: UInt32) throws {
        let folder = try AppendOnlyFileTests.makeFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        let files = [try AppendOnlyFile(path: folder + "/a"), try AppendOnlyFile(path: folder + "/b")]
        let failures = Mutex<[String]>([])
        let sync = BackgroundSync(name: "test-sync", gatherMicroseconds: gatherMicroseconds) { file, error in
            failures.withLock { $0.append("\(file.path): \(error)") }
        }
        let appendLock = Mutex(())
        let last = Mutex<[UInt64]>([0, 0])
        let done = DispatchGroup()
        for t in 0..<4 {
            done.enter()
            Thread {
                defer { done.leave() }
                for i in 0..<100 {
                    let which = (t + i) % 2
                    // Appends to one file are serialized by their owner (AppendOnlyFile's contract).
                    let appended = appendLock.withLock { _ in
                        let appended = try? files[which].append(Array("\(t) \(i)\n".utf8))
                        if let appended { last.withLock { $0[which] = max($0[which], appended.sequence) } }
                        return appended
                    }
                    if let appended { sync.request(appended) }
                }
            }.start()
        }
        done.wait()
        let wanted = last.withLock { $0 }
        #expect(wanted == [200, 200])
        #expect(eventually { sync.outstanding == 0 }, "requests still outstanding: \(sync.outstanding)")
        #expect(files[0].syncedThrough == wanted[0] && files[1].syncedThrough == wanted[1],
                "synced \(files.map(\.syncedThrough)), appended \(wanted)")
        #expect(failures.withLock { $0 }.isEmpty)
        // Later requests start the thread again if it ended meanwhile.
        let more = try files[0].append(Array("late\n".utf8))
        sync.request(more)
        #expect(sync.flush(timeoutMilliseconds: 60_000))
        #expect(files[0].syncedThrough == more.sequence)
    }

    @Test("an fdatasync that fails is reported with its file, and leaves nothing outstanding")
    func failureIsReported() throws {
        let folder = try AppendOnlyFileTests.makeFolder()
        defer { try? FileManager.default.removeItem(atPath: folder) }
        // A node of the null device (major 1, minor 3: makedev is a C macro): writes succeed, fdatasync answers EINVAL.
        let path = folder + "/null"
        try #require(mknod(path, S_IFCHR | 0o600, dev_t(1 << 8 | 3)) == 0, "mknod needs root: \(Errno.current)")
        let file = try AppendOnlyFile(path: path)
        let failures = Mutex<[String]>([])
        let sync = BackgroundSync(name: "test-sync") { file, error in failures.withLock { $0.append("\(file.path): \(error)") } }
        sync.request(try file.append(Array("one\n".utf8)))
        #expect(sync.flush(timeoutMilliseconds: 60_000))
        let reported = failures.withLock { $0 }
        #expect(reported.count == 1 && reported.first?.hasPrefix(path + ": ") == true, "\(reported)")
        #expect(file.syncedThrough == 0)
    }
}
