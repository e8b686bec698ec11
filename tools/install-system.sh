#!/bin/bash
# System-wide install of stapsrv (root).  `install` is idempotent: a second
# run changes nothing.  `uninstall` removes what `install` put in place and
# keeps user data (logs, the stap-server user's home and certificate);
# `uninstall --purge` removes those too, and the user and group if the
# install created them.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/usr/lib/stapsrv
MANIFEST=/var/lib/stapsrv-install/created
USER_NAME=stap-server
HOME_DIR=/var/lib/stap-server

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system: run as root" >&2
    exit 1
fi

# file SOURCE TARGET MODE: install a file only when its content or mode differs.
file() {
    local source=$1 target=$2 mode=$3
    if ! cmp -s "$source" "$target" || [ "$(stat -c %a "$target")" != "$mode" ]; then
        install -D -m "$mode" "$source" "$target"
    fi
}

# dir PATH MODE OWNER
dir() {
    install -d -m "$2" -o "${3%:*}" -g "${3#*:}" "$1"
}

remember() {
    mkdir -p "$(dirname "$MANIFEST")"
    grep -qxF "$1" "$MANIFEST" 2>/dev/null || echo "$1" >> "$MANIFEST"
}

source_digest() {
    find setup.cfg setup.py pyproject.toml stapsrv twisted -type f ! -name '*.pyc' \
        ! -path '*/__pycache__/*' ! -name dropin.cache -print0 | sort -z \
        | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

install_all() {
    if ! getent group "$USER_NAME" >/dev/null; then
        groupadd --system "$USER_NAME"
        remember group
    fi
    if ! id -u "$USER_NAME" >/dev/null 2>&1; then
        useradd --system --gid "$USER_NAME" --home-dir "$HOME_DIR" --create-home \
            --shell /usr/sbin/nologin --comment "SystemTap compile server" "$USER_NAME"
        remember user
    fi
    dir "$HOME_DIR" 750 "$USER_NAME:$USER_NAME"

    local digest
    digest=$(source_digest)
    if [ ! -x "$PREFIX/bin/python" ] || [ "$(cat "$PREFIX/.source-digest" 2>/dev/null)" != "$digest" ]; then
        rm -rf "$PREFIX"
        /usr/bin/python3 -m venv "$PREFIX"
        "$PREFIX/bin/pip" install -q --disable-pip-version-check .
        rm -rf build stapsrv.egg-info
        "$PREFIX/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
        echo "$digest" > "$PREFIX/.source-digest"
    fi
    [ "$(readlink /usr/local/bin/stap-server 2>/dev/null)" = "$PREFIX/bin/stap-server" ] \
        || ln -sfn "$PREFIX/bin/stap-server" /usr/local/bin/stap-server

    [ -e /etc/default/stap-server ] || install -m 644 config/stap-server.global /etc/default/stap-server
    dir /etc/stap-server 755 root:root
    dir /etc/stap-server/conf.d 755 root:root
    file config/conf.d/native.conf.example /etc/stap-server/conf.d/native.conf.example 644
    dir /run/stap-server 755 "$USER_NAME:$USER_NAME"
    dir /var/log/stap-server 755 "$USER_NAME:$USER_NAME"
    if [ -e /var/log/stap-server/log ] && [ "$(stat -c %U /var/log/stap-server/log)" != "$USER_NAME" ]; then
        chown "$USER_NAME:$USER_NAME" /var/log/stap-server/log
    fi
    file config/stap-server.tmpfiles /usr/lib/tmpfiles.d/stap-server.conf 644
    # The unit runs $PREFIX/bin/twistd, where the Debian package has it too.
    file config/stap-server.service /etc/systemd/system/stap-server.service 644
    file config/stap-server.logrotate /etc/logrotate.d/stap-server 644
    # System-wide trust: local clients trust the server, staprun its signatures.
    local ssl="$HOME_DIR/.systemtap/ssl/server"
    setpriv --reuid="$USER_NAME" --regid="$USER_NAME" --init-groups env -i HOME="$HOME_DIR" \
        PATH=/usr/bin:/bin LANG=C.UTF-8 "$PREFIX/bin/python" -m stapsrv.cli.systemtrust identity "$ssl" >/dev/null
    for database in /etc/systemtap/ssl/client /etc/systemtap/staprun; do
        [ -e "$database/cert9.db" ] || remember "trust-database $database"
    done
    "$PREFIX/bin/python" -m stapsrv.cli.systemtrust trust "$ssl/stap.cert" \
        /etc/systemtap/ssl/client /etc/systemtap/staprun >/dev/null
    file doc/stap-server.8 /usr/local/share/man/man8/stap-server.8 644
    file doc/cs/stap-server.8 /usr/local/share/man/cs/man8/stap-server.8 644
}

uninstall_all() {
    local purge=${1:-}
    if [ -x /usr/local/bin/stap-server ]; then
        /usr/local/bin/stap-server stop >/dev/null 2>&1 || true
    fi
    # Trust databases the install created go; existing ones are left alone.
    sed -n 's/^trust-database //p' "$MANIFEST" 2>/dev/null | while read -r database; do
        rm -f "$database/cert9.db" "$database/key4.db" "$database/pkcs11.txt"
        rmdir "$database" 2>/dev/null || true
        sed -i "\|^trust-database $database\$|d" "$MANIFEST"
    done
    rm -f /usr/local/bin/stap-server /etc/systemd/system/stap-server.service \
        /etc/logrotate.d/stap-server /usr/lib/tmpfiles.d/stap-server.conf \
        /usr/local/share/man/man8/stap-server.8 /usr/local/share/man/cs/man8/stap-server.8 \
        /etc/stap-server/conf.d/native.conf.example
    rm -rf "$PREFIX" /run/stap-server
    cmp -s config/stap-server.global /etc/default/stap-server && rm -f /etc/default/stap-server
    rmdir /etc/stap-server/conf.d /etc/stap-server 2>/dev/null || true
    if [ "$purge" = "--purge" ]; then
        rm -rf /var/log/stap-server
        if grep -qx user "$MANIFEST" 2>/dev/null; then
            userdel "$USER_NAME" 2>/dev/null || true
            rm -rf "$HOME_DIR"
        fi
        if grep -qx group "$MANIFEST" 2>/dev/null; then
            groupdel "$USER_NAME" 2>/dev/null || true
        fi
        rm -rf "$(dirname "$MANIFEST")"
    fi
}

case "${1:-}" in
    install) install_all ;;
    uninstall) uninstall_all "${2:-}" ;;
    *) echo "usage: $0 install | uninstall [--purge]" >&2; exit 2 ;;
esac
