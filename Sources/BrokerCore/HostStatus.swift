import Foundation

/// What an operator needs to know about the machine the broker runs on:
/// CPUs, memory, load and the free space of the database's filesystem.
public struct HostStatus: Sendable, Equatable {
    public var cpus: Int
    public var memoryTotalBytes: UInt64
    /// `MemAvailable` from /proc/meminfo; nil where it cannot be read.
    public var memoryAvailableBytes: UInt64?
    /// 1, 5 and 15 minute load averages; nil where /proc/loadavg cannot be read.
    public var loadAverage: [Double]?
    public var disk: DiskStatus?

    /// Free space below which the disk counts as nearly full (5% or 100 MiB, whichever is larger).
    public static func diskNearlyFull(_ disk: DiskStatus) -> Bool {
        let floor = max(disk.totalBytes / 20, 100 * 1024 * 1024)
        return disk.freeBytes < floor
    }

    /// Reads the figures now; `path` names a file or folder on the filesystem to measure.
    public static func current(diskPath: String) -> HostStatus {
        let info = ProcessInfo.processInfo
        return HostStatus(cpus: info.activeProcessorCount,
                          memoryTotalBytes: info.physicalMemory,
                          memoryAvailableBytes: memoryAvailable(),
                          loadAverage: loadAverage(),
                          disk: DiskStatus(path: diskPath))
    }

    /// Problems worth failing `--health` for, each a sentence; empty when fine.
    public var problems: [String] {
        var found: [String] = []
        if let disk {
            if Self.diskNearlyFull(disk) {
                found.append("disk nearly full: \(Format.bytes(disk.freeBytes)) free of \(Format.bytes(disk.totalBytes)) on the filesystem of \(disk.path)")
            }
        } else {
            found.append("cannot measure the free disk space")
        }
        if let available = memoryAvailableBytes, memoryTotalBytes > 0, available < memoryTotalBytes / 50 {
            found.append("memory nearly exhausted: \(Format.bytes(available)) available of \(Format.bytes(memoryTotalBytes))")
        }
        return found
    }

    private static func memoryAvailable() -> UInt64? {
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if fields.count >= 2, let kib = UInt64(fields[1]) { return kib * 1024 }
        }
        return nil
    }

    private static func loadAverage() -> [Double]? {
        guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8) else { return nil }
        let values = text.split(separator: " ").prefix(3).compactMap { Double($0) }
        return values.count == 3 ? values : nil
    }
}

/// Free and total space of the filesystem holding a path.
public struct DiskStatus: Sendable, Equatable {
    /// The path measured: the nearest existing folder of the one asked about.
    public var path: String
    public var freeBytes: UInt64
    public var totalBytes: UInt64

    public init(path: String, freeBytes: UInt64, totalBytes: UInt64) {
        self.path = path
        self.freeBytes = freeBytes
        self.totalBytes = totalBytes
    }

    /// Measures the filesystem of `path`, or of its nearest existing parent.
    public init?(path: String) {
        var candidate = URL(fileURLWithPath: path)
        while !FileManager.default.fileExists(atPath: candidate.path) && candidate.path != "/" {
            candidate.deleteLastPathComponent()
        }
        guard let attributes = try? FileManager.default.attributesOfFileSystem(forPath: candidate.path),
              let free = (attributes[.systemFreeSize] as? NSNumber)?.uint64Value,
              let total = (attributes[.systemSize] as? NSNumber)?.uint64Value else { return nil }
        self.init(path: candidate.path, freeBytes: free, totalBytes: total)
    }
}

/// Human-readable figures.
public enum Format {
    /// 1536 → "1.5 KiB".
    public static func bytes(_ value: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var amount = Double(value)
        var unit = 0
        while amount >= 1024 && unit < units.count - 1 {
            amount /= 1024
            unit += 1
        }
        return unit == 0 ? "\(value) B" : String(format: "%.1f", amount) + " " + units[unit]
    }
}
