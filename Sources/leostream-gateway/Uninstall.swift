import ArgumentParser
import GatewayConfig
import GatewayControl
import NetfilterKernel
import SystemLayer

/// `leostream-gateway uninstall`: removes what the gateway put outside its
/// state directory, which is the kernel path's nftables table. No other
/// table or chain is touched. Refused while the gateway runs (its flows
/// would stop).
struct Uninstall: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove the gateway's nftables table (the kernel path); the state directory is kept.")

    @OptionGroup var global: GlobalOptions

    @Option(name: .long, help: ArgumentHelp("The table to remove (default: the config's kernel_table, else leostream_gateway).", valueName: "name"))
    var kernelTable: String?

    func run() throws {
        var name = kernelTable ?? "leostream_gateway"
        if kernelTable == nil, let config = global.config {
            do { name = try ConfigParser.load(path: config).kernelTable } catch {
                printError("error: \(error)")
                throw ExitCode(2)
            }
        }
        if let pid = StateDirectory(global.stateDir).runningPID() {
            printError("error: the gateway is running (pid \(pid)); stop it first: removing the table would cut the flows it carries")
            throw ExitCode(1)
        }
        let table = KernelTable(name: name)
        do throws(NetfilterError) {
            guard try table.exists() else {
                print("no table inet \(name): nothing to remove")
                return
            }
            try table.delete()
            print("removed table inet \(name) (the kernel path's forwards); flows it carried end as their conntrack entries time out")
        } catch {
            printError("error: table inet \(name): \(error)")
            throw ExitCode(1)
        }
    }
}
