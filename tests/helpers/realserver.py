"""Real processes for integration tests and the benchmark.

Servers (stapsrv's twistd plugin or the original stap-serverd 4.8) run as
an unprivileged user through ``setpriv`` (which execs in place, so the pid
we hold is the server's own); clients are the real ``stap`` with a private
``SYSTEMTAP_DIR`` each.  Everything listens on and connects to loopback.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from attrs import frozen
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from stapsrv.identity.certs import cert_serial_text
from tests.helpers import header_release, require

STAP = "/usr/bin/stap"
STAP_SERVERD = "/usr/lib/systemtap/stap-serverd"
#: stap-serverd 5.5 (make setup installs it with the 5.5 client); it runs the
#: 5.5 translator, /opt/stap55/bin/stap.
STAP_SERVERD_55 = "/opt/stap55/libexec/systemtap/stap-serverd"
#: Shared, persistent state so only the first compile of a run is cold.
STATE = Path(os.environ.get("STAPSRV_TEST_STATE", "/var/tmp/stapsrv-tests"))
_PORT_LINE = re.compile(r"Using network address \[[^\]]*\]:(\d+)")


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_user() -> pwd.struct_passwd:
    """The unprivileged account servers run as (ourselves when not root)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    return pwd.getpwnam(os.environ.get("STAPSRV_TEST_USER", "stapsrv"))


def as_server_user(argv: Sequence[str]) -> list[str]:
    if os.geteuid() != 0:
        return list(argv)
    user = test_user()
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
            "--init-groups", *argv]


def owned_directory(path: Path) -> Path:
    """Create ``path`` (and parents) owned by the server user, mode 0755."""
    path.mkdir(parents=True, exist_ok=True)
    user = test_user()
    for part in [path, *path.parents]:
        if part == STATE.parent:
            break
        if os.geteuid() == 0:
            os.chown(part, user.pw_uid, user.pw_gid)
        part.chmod(0o755)
    return path


def kept_directory(variable: str, name: str) -> Path:
    """A directory kept between test runs (downloads worth keeping: kernel
    images, -dbg results), owned by the server's user: ``$variable`` if
    set, else ``/var/cache/stapsrv-ci/<name>`` for root, else a scratch
    directory.  Nothing may depend on what it already holds."""
    configured = os.environ.get(variable)
    if configured:
        path = Path(configured)
    elif os.geteuid() == 0:
        path = Path("/var/cache/stapsrv-ci") / name
    else:
        path = scratch_directory(f"{name}-")
    path.mkdir(parents=True, exist_ok=True)
    user = test_user()
    if os.geteuid() == 0:
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o755)
    return path


def scratch_directory(prefix: str) -> Path:
    owned_directory(STATE)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=STATE))
    return owned_directory(path)


class _Collect(ProcessProtocol):
    def __init__(self, stdin: bytes | None) -> None:
        self.stdin = stdin
        self.out = bytearray()
        self.err = bytearray()
        self.done: Deferred[tuple[bytes, bytes, int]] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if code is None:
            code = 128 + (getattr(reason.value, "signal", 0) or 0)
        self.done.callback((bytes(self.out), bytes(self.err), code))


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None,
        stdin: bytes | None = None) -> Deferred[tuple[bytes, bytes, int]]:
    """Run a program to completion without blocking the reactor."""
    protocol = _Collect(stdin)
    reactor.spawnProcess(protocol, argv[0], list(argv),
                         env=dict(os.environ if env is None else env),
                         path=str(cwd) if cwd else None)
    return protocol.done


@frozen
class ClientKind:
    """One installed SystemTap client: its ``stap`` and ``staprun``, and the
    ``sysconfdir`` its ``staprun`` reads trusted signers from."""

    version: str
    stap: str
    staprun: str
    sysconfdir: str

    def require(self) -> None:
        require(Path(self.stap).exists(),
                f"the SystemTap {self.version} client {self.stap} is not installed "
                "(run 'make setup')")


#: Debian bookworm's client.
CLIENT_48 = ClientKind("4.8", STAP, "/usr/bin/staprun", "/etc")
#: Upstream's current release, from ../shared/clients (make setup installs it).
CLIENT_55 = ClientKind("5.5", "/opt/stap55/bin/stap", "/opt/stap55/bin/staprun",
                       "/opt/stap55/etc")


class Client:
    """A real stap client with its own SYSTEMTAP_DIR and working directory."""

    def __init__(self, base: Path, kind: ClientKind = CLIENT_48) -> None:
        self.kind = kind
        self.dir = base
        self.systemtap_dir = base / "systemtap"
        self.cwd = base / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.systemtap_dir.mkdir(exist_ok=True)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.dir),
               "SYSTEMTAP_DIR": str(self.systemtap_dir), "LANG": "C.UTF-8"}
        env.update(extra or {})
        return env

    def stap(self, *args: str, stdin: bytes | None = None,
             env: Mapping[str, str] | None = None) -> Deferred[tuple[bytes, bytes, int]]:
        return run([self.kind.stap, *args], self.env(env), self.cwd, stdin)

    async def trust(self, spec: str) -> None:
        out, err, code = await self.stap(f"--use-server={spec}", "--trust-servers=ssl,no-prompt")
        if code != 0:
            raise AssertionError(f"trusting {spec} failed ({code}): {err.decode()}")

    def modules(self) -> list[str]:
        return sorted(p.name for p in self.cwd.iterdir() if p.name.endswith((".ko", ".sgn")))


class ServerProcess:
    """A compile server process (plain subprocess: it may outlive one test)."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str],
                 base: Path, log: Path) -> None:
        self.name = name
        self.base = base
        self.log_path = log
        self.output_path = base / "output.txt"
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                as_server_user(argv), env=dict(env), cwd="/", stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def certificate(self) -> x509.Certificate:
        """The server's certificate (``<base>/ssl/stap.cert``)."""
        return x509.load_der_x509_certificate((self.base / "ssl" / "stap.cert").read_bytes())

    def serial(self) -> str:
        """Its serial as clients show it (``certinfo``)."""
        return cert_serial_text(self.certificate())

    def log(self, path: Path | None = None) -> str:
        try:
            return (path or self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_for_port(self, timeout: float = 120.0, log: Path | None = None) -> int:
        """The port logged in this server's log (or in ``log``, for a process
        running several servers with a log each)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _PORT_LINE.search(self.log(log))
            if match:
                if log is None:
                    self.port = int(match.group(1))
                return int(match.group(1))
            if self.exit_code is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{self.name} did not start (exit {self.exit_code}).\nlog:\n{self.log()}\n"
            f"output:\n{self.output()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def server_environment(base: Path, name: str) -> dict[str, str]:
    user = test_user()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir,
           "USER": user.pw_name, "LANG": "C.UTF-8",
           "TMPDIR": str(owned_directory(base / "tmp")),
           "SYSTEMTAP_DIR": str(owned_directory(STATE / f"{name}-systemtap")),
           "XDG_CACHE_HOME": str(owned_directory(STATE / "cache")),
           "STAPSRV_LISTEN": "127.0.0.1"}
    return env


def start_stapsrv(arguments: Sequence[str] = (), release: str | None = None,
                  env: Mapping[str, str] | None = None, wait: bool = True,
                  listen: str = "127.0.0.1", ssl_dir: Path | None = None,
                  prefix: Sequence[str] = (),
                  twistd_log: str | None = None) -> ServerProcess:
    """``twistd stap-server`` from the venv, as the test user, on loopback.

    ``ssl_dir`` defaults to a fresh ``<base>/ssl``; ``prefix`` runs twistd
    through another program (``systemd-socket-activate ...``), which must
    exec it; ``twistd_log`` is twistd's log option (default: a
    ``--logfile`` in ``<base>``; ``--logger=...`` as the systemd unit
    has it writes to the process's output).
    """
    base = scratch_directory("stapsrv-")
    ssl_dir = base / "ssl" if ssl_dir is None else ssl_dir
    release = release or header_release()
    log = base / "server.log"
    twistd_log = twistd_log or f"--logfile={base / 'twistd.log'}"
    argv = [*prefix, venv_bin("twistd"), "--nodaemon", "--pidfile=", twistd_log,
            "stap-server", "--listen", listen, "--port", "0",
            "--ssl", str(ssl_dir), "--log", str(log)]
    if release:
        argv += ["-r", release]
    if "--cache-dir" not in arguments and "--no-cache" not in arguments:
        # A response cache of its own: what a test sees must not depend on
        # what earlier runs left in a shared one.
        argv += ["--cache-dir", str(owned_directory(base / "response-cache"))]
    argv += list(arguments)
    full_env = server_environment(base, "stapsrv")
    full_env.update(env or {})
    server = ServerProcess("stapsrv", argv, full_env, base, log)
    if wait:
        server.wait_for_port()
    return server


def start_stap_serverd(arguments: Sequence[str] = (), release: str | None = None,
                       program: str = STAP_SERVERD, name: str = "serverd") -> ServerProcess:
    """The original stap-serverd (4.8, or ``program``: 5.5's is
    :data:`STAP_SERVERD_55`), as the test user (it binds [::]).  ``name``
    picks its SYSTEMTAP_DIR (see :func:`server_environment`)."""
    base = scratch_directory(f"{name}-")
    release = release or header_release()
    log = base / "server.log"
    argv = [program, "--port", "0", "--ssl", str(base / "ssl"), f"--log={log}"]
    if release:
        argv += ["-r", release]
    argv += list(arguments)
    server = ServerProcess(os.path.basename(program), argv, server_environment(base, name),
                           base, log)
    server.wait_for_port()
    return server


_shared: dict[tuple[str, ...], ServerProcess] = {}


def shared_server(kind: str = "stapsrv", arguments: Sequence[str] = ()) -> ServerProcess:
    """One long-lived server per (kind, arguments) for the whole test run."""
    key = (kind, *arguments)
    server = _shared.get(key)
    if server is None or server.exit_code is not None:
        if kind == "stapsrv":
            server = start_stapsrv(arguments)
        else:
            server = start_stap_serverd(arguments)
        _shared[key] = server
    return server


@atexit.register
def _stop_shared() -> None:
    for server in _shared.values():
        server.stop()


def fake_mokutil(directory: Path, label: str, fingerprint: str) -> None:
    """A ``mokutil`` in ``directory`` whose ``--list-enrolled`` shows one
    Systemtap MOK with a ``SHA1`` or ``SHA256 Fingerprint:`` line, as real
    mokutil versions do (a client with ``SYSTEMTAP_SIGN`` set runs it)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "mokutil"
    script.write_text(
        "#!/bin/sh\ncat <<'EOF'\n[key 1]\n"
        f"{label} Fingerprint: {fingerprint}\n"
        "Certificate:\n    Data:\n        Version: 3 (0x2)\n"
        "        Issuer: O=Systemtap, CN=Systemtap module signing key\nEOF\n")
    script.chmod(0o755)


def generate_server_mok(systemtap_dir: Path) -> Path:
    """A new MOK in the store of a server whose SYSTEMTAP_DIR is
    ``systemtap_dir``, made by the admin command as the server user."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": test_user().pw_dir, "SYSTEMTAP_DIR": str(systemtap_dir)}
    result = subprocess.run(as_server_user([venv_bin("python"), "-m", "stapsrv.cli.mok", "generate"]),
                            env=env, capture_output=True, text=True, timeout=120, cwd="/")
    if result.returncode != 0:
        raise AssertionError(f"python -m stapsrv.cli.mok generate failed: {result.stderr}")
    return systemtap_dir / "ssl" / "server" / "moks" / result.stdout.strip()


def fixed_runtime_for(release: str) -> str | None:
    """The runtime copy stapsrv would use for ``release`` (shared cache)."""
    from stapsrv.kernel.runtime import select_runtime
    path = select_runtime(Path("/lib/modules") / release / "build",
                          cache_root=owned_directory(STATE / "cache" / "stapsrv"))
    if path is None:
        return None
    return str(path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


