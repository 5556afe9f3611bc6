# Sourced by the scripts: puts the Swift toolchain on PATH when it is installed
# at /opt/swift but not on PATH (as on a fresh machine of this kind).
if ! command -v swift >/dev/null 2>&1 && [ -x /opt/swift/usr/bin/swift ]; then
  export PATH="/opt/swift/usr/bin:$PATH"
fi
