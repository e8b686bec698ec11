# stapsrv: developer and CI entry points.  Run as root on Debian bookworm;
# `make setup` installs whatever is missing, so every target works on a
# fresh machine.

SHELL := /bin/bash
PYTHON := /usr/bin/python3
VENV := .venv
SERVER_USER ?= stapsrv
PORT ?= 0
# The shared folder beside the checkout (SystemTap 5.5 for the tests).
SHARED ?= ../shared
STAP55_TARBALL ?= $(SHARED)/clients/systemtap-5.5-bookworm-amd64.tar.xz
APT_PACKAGES := systemtap systemtap-client systemtap-server libnss3-tools \
	dbus-daemon avahi-daemon avahi-utils redis-server python3-venv zip unzip util-linux passwd groff-base man-db \
	bubblewrap haproxy prometheus debhelper lintian fakeroot debootstrap systemd-container \
	qemu-system-x86 busybox-static apt-utils gpg gpg-agent debian-archive-keyring \
	gcc-aarch64-linux-gnu qemu-system-arm

.PHONY: setup system-packages stap55 server-user venv serve test clean install-system uninstall-system deb

setup: system-packages stap55 server-user venv

system-packages:
	@bash tools/install-system-packages.sh $(APT_PACKAGES)

stap55: system-packages
	@bash tools/install-stap55.sh $(STAP55_TARBALL)

# The test/serve user belongs to group stap-server, as every server user must
# once that group exists (make install-system creates it for the system).
server-user:
	@getent group stap-server >/dev/null || groupadd --system stap-server
	@id -u $(SERVER_USER) >/dev/null 2>&1 || useradd --create-home --shell /usr/sbin/nologin $(SERVER_USER)
	@id -nG $(SERVER_USER) | grep -qw stap-server || usermod -aG stap-server $(SERVER_USER)

venv:
	@bash tools/make-venv.sh $(PYTHON) $(VENV) $(SERVER_USER)

serve: setup
	@bash tools/serve.sh $(VENV) $(SERVER_USER) $(PORT)

# The type check (mypy --strict, configured in setup.cfg) comes first: a
# failing one fails the run.
test: setup
	@$(VENV)/bin/mypy
	@STAPSRV_TEST_USER=$(SERVER_USER) $(VENV)/bin/python tests/run.py $(TESTS)

install-system: system-packages
	@bash tools/install-system.sh install

uninstall-system:
	@bash tools/install-system.sh uninstall $(if $(PURGE),--purge)

# The Debian package, built from a copy of the tree into dist/.
deb: system-packages
	@bash tools/build-deb.sh dist

clean:
	rm -rf $(VENV) build dist debian/.debhelper debian/stapsrv debian/files *.egg-info _trial_temp .mypy_cache
