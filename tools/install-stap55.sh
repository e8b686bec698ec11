#!/bin/bash
# Install SystemTap 5.5 (client, staprun, stap-serverd) at /opt/stap55 from
# the build in the shared folder (see its README): the tests run every
# real-client check with it as well as with Debian's 4.8.  Does nothing when
# it is there already.
set -euo pipefail
tarball=$1
prefix=/opt/stap55

if [ -x "$prefix/bin/stap" ] && "$prefix/bin/stap" --version 2>&1 | grep -q "version 5\.5/"; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "SystemTap 5.5 is not installed at $prefix; run 'make setup' as root." >&2
    exit 1
fi
if [ ! -f "$tarball" ]; then
    echo "SystemTap 5.5 build not found at $tarball (set SHARED=... to the shared folder)." >&2
    exit 1
fi
tar -C / -xJf "$tarball"
# staprun looks for trusted signers under its sysconfdir; the tests mount
# over this directory in a private namespace, so it must exist.
mkdir -p "$prefix/etc/systemtap"
"$prefix/bin/stap" --version 2>&1 | head -n 1
