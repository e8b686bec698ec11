#!/bin/bash
# Create the project venv with Debian's Python (the server user must be able
# to run it, and /root, where pyenv lives, is private) and install stapsrv
# into it (a real install, not an editable one, so twistd finds the plugin).
#
# When the server user cannot reach the checkout (a parent directory without
# o+x), the venv is made under /var/lib/stapsrv-dev and .venv points to it.
set -euo pipefail
python=$1 venv=$2 user=$3

if [ ! -e "$venv" ] && [ "$(id -u)" -eq 0 ] && id -u "$user" >/dev/null 2>&1 \
        && ! runuser -u "$user" -- test -x "$PWD"; then
    outside=/var/lib/stapsrv-dev/$(printf %s "$PWD" | sha1sum | cut -c1-12)
    mkdir -p "$outside"
    chmod 755 /var/lib/stapsrv-dev "$outside"
    ln -s "$outside/venv" "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$(realpath -m "$venv")"
    "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
fi
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
"$venv/bin/python" -c "import twisted, txdbus, hypothesis, redis, prometheus_client, lz4, zstandard, mypy, mypy_zope" 2>/dev/null \
    || "${pip[@]}" . hypothesis mypy mypy-zope
"${pip[@]}" --force-reinstall --no-deps .
rm -rf build stapsrv.egg-info
# Regenerate the plugin cache so twistd lists stap-server for every user.
"$venv/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

if [ "$(id -u)" -eq 0 ] && id -u "$user" >/dev/null 2>&1 \
        && ! runuser -u "$user" -- test -x "$venv/bin/python"; then
    echo "User $user cannot run $(realpath "$venv")/bin/python." >&2
    exit 1
fi
