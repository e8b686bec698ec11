#!/bin/bash
# `make serve`: run stapsrv in the foreground as the unprivileged server user.
set -euo pipefail
venv=$1 user=$2 port=$3
python=$(realpath "$venv")/bin/python
cd /   # the installed package is used, not the checkout
if [ "$(id -u)" -eq 0 ]; then
    home=$(getent passwd "$user" | cut -d: -f6)
    exec setpriv --reuid="$user" --regid="$user" --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$home" USER="$user" LANG=C.UTF-8 \
        "$python" -m stapsrv.cli.quickstart --port "$port"
fi
exec "$python" -m stapsrv.cli.quickstart --port "$port"
