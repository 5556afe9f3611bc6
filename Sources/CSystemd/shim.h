// Umbrella header for the libsystemd system library; see Package.swift.
#include <systemd/sd-daemon.h>
