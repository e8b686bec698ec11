#!/bin/bash
# Install the Debian packages stapsrv needs (arguments), plus kernel headers
# for a kernel that is *not* running: the newest linux-headers-6.1.0-N-amd64
# (modules are cross-built for it with -r).  Does nothing when all are there.
set -euo pipefail

missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ! ls -d /usr/src/linux-headers-6.1.0-*-amd64 >/dev/null 2>&1; then
    missing+=(HEADERS)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "Missing system packages (${missing[*]}); run 'make setup' as root." >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
packages=("$@")
if [[ " ${missing[*]} " == *" HEADERS "* ]]; then
    headers=$(apt-cache search --names-only '^linux-headers-6\.1\.0-[0-9]+-amd64$' \
              | awk '{print $1}' | sort -V | tail -n 1)
    if [ -z "$headers" ]; then
        echo "No linux-headers-6.1.0-N-amd64 package is available." >&2
        exit 1
    fi
    packages+=("$headers")
fi
# policy-rc.d keeps avahi-daemon and friends from being started by dpkg;
# the tests start their own on a private bus.
apt-get install -y -q --no-install-recommends "${packages[@]}"
