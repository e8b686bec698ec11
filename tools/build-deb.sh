#!/bin/bash
# Build the Debian package (dpkg-buildpackage -us -uc -b) from a copy of this
# checkout, so the tree stays clean and the results land in OUT (default
# dist/): stapsrv_<version>_<arch>.deb, .buildinfo and .changes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
work=$(mktemp -d /var/tmp/stapsrv-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stapsrv" "$out"
# The files git knows (committed or not), as they are in the work tree.
git ls-files -z --cached --others --exclude-standard | grep -zv '^\.venv' \
    | xargs -0 cp --parents -t "$work/stapsrv" 2>/dev/null || true
(cd "$work/stapsrv" && dpkg-buildpackage -us -uc -b)
cp "$work"/stapsrv_*.deb "$work"/stapsrv_*.buildinfo "$work"/stapsrv_*.changes "$out"/
