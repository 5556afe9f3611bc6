// Umbrella header for the libsystemd system library; see Package.swift.
// sd-daemon: readiness, status and watchdog notifications, socket activation.
// sd-journal: structured log entries (sd_journal_sendv: the variadic
// sd_journal_send cannot be called from Swift).
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>
