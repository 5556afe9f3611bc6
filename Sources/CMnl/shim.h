// Umbrella header for the libmnl system library; see Package.swift.
#include <libmnl/libmnl.h>
