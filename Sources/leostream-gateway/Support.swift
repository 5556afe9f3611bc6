import SystemLayer

/// Writes a line to standard error.
func printError(_ message: String) {
    StandardStreams.writeError(message + "\n")
}

enum ProcessInfoLite {
    static var pid: Int32 { SystemInfo.processID }
}
