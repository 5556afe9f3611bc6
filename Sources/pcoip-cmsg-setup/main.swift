import CMSGSetup
import Foundation
import Glibc
import ServiceSupport
import SystemLayer

let help = """
    USAGE: pcoip-cmsg-setup install|configure|status|uninstall [FLAGS]

    Installs, configures, reports on and removes this package's PCoIP Connection
    Manager and Security Gateway, with the flags of HP's tool of the same name.
    Booleans as --flag=true|false (a bare --flag means true); --external-pcoip-ip
    and --external-sg-ip may repeat. Missing required values are asked on a
    terminal; without one the command fails naming the flag. A failure changes
    nothing.

    install     --accept-policies --broker-url URL --external-pcoip-ip IP
                (--self-signed | --ssl-cert FILE --ssl-key FILE) [--ca-cert FILE]
                [--enable-connection-manager=BOOL] [--enable-security-gateway=BOOL]
                [--external-sg-ip PUBLIC_IP[:PORT][@CONTROL_HOST:PORT]]...
                [--jwt-signing-key FILE --jwt-verifying-cert FILE] (made when absent)
                [--host-address NAME] [--enable-collaboration] [--enable-ipv6]
                [--ignore-disk-req] [--debug] [--allow-self-signed-broker]
    configure   any of the flags above: changes only what they name, and makes the
                running services re-read their config (no session is dropped)
    status      the services, their health, the broker, the gateways, sessions
    uninstall   stops the services and removes what install wrote

    This package's own flags: --data-dir DIR (default \(SetupEnvironment.defaultDataDirectory)),
    --bin-dir DIR (where pcoip-connection-manager and pcoip-security-gateway are;
    default: beside this program), --systemd-dir DIR (default /etc/systemd/system),
    --gateway-group NAME, --cm-listen / --cm-control / --sg-listen / --sg-control
    HOST:PORT, --max-session-establishments N (40), --max-client-communications N
    (400), --max-connections N (5000), --no-start.

    Accepted with a warning (they concern HP's Docker images): --darksite-bundle-path.
    Refused by name: SSO enrollment, OAuth, Horizon and licensing flags.
    """

let arguments = Array(CommandLine.arguments.dropFirst())
if arguments == ["--version"] || arguments == ["version"] {
    print(ProductVersion.line)
    exit(0)
}
if arguments.isEmpty || arguments.contains("--help") || arguments.contains("-h") || arguments == ["help"] {
    print(help)
    exit(arguments.isEmpty ? 2 : 0)
}

let flags: SetupFlags
do throws(SetupError) {
    flags = try SetupFlags(arguments)
} catch {
    StandardStreams.writeError("pcoip-cmsg-setup: \(error)\n")
    exit(error.exitCode)
}

let programFolder = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent().path
let interactive = isatty(0) == 1
let environment = SetupEnvironment(
    dataDirectory: SetupEnvironment.defaultDataDirectory,
    binDirectory: flags.string("bin-dir") ?? programFolder,
    systemdDirectory: flags.string("systemd-dir") ?? "/etc/systemd/system",
    systemdRunning: FileManager.default.fileExists(atPath: "/run/systemd/system"),
    ask: { question in
        guard interactive else { return nil }
        StandardStreams.writeOutput(question)
        return readLine()
    },
    print: { line in StandardStreams.writeOutput(line + "\n") },
    hostName: ProcessInfo.processInfo.hostName)

// The steps read and write files and wait for processes: on threads made
// for blocking work.
let status: Int32 = await withTaskExecutorPreference(BlockingExecutor.shared) {
    do throws(SetupError) {
        try await CMSGSetup.run(flags, environment)
        return 0
    } catch {
        StandardStreams.writeError("pcoip-cmsg-setup \(flags.command.rawValue): \(error)\n")
        return error.exitCode
    }
}
exit(status)
