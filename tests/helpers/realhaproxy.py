"""A real ``haproxy`` in TCP mode in front of stapsrv instances on loopback,
with the PROXY protocol towards them and health checks against each
instance's ``/healthz``; its admin socket tells what it thinks of them."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from attrs import frozen

from tests.helpers import require_program
from tests.helpers.realredis import free_port


#: The address HAProxy connects to the instances from.
PROXY_SOURCE = "127.0.0.3"


@frozen
class Backend:
    """One instance: its compile port and, for health checks, its metrics port."""

    name: str
    port: int
    health_port: int | None = None


def haproxy_config(port: int, backends: Sequence[Backend], admin_socket: Path,
                   interval_ms: int = 500) -> str:
    """The configuration: shaped like config/haproxy.cfg, on loopback, with
    short check intervals so a test sees state changes quickly."""
    lines = [
        "global",
        f"    stats socket {admin_socket} mode 600 level admin",
        "    maxconn 2000",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 10m",
        "    timeout server 10m",
        "    retries 3",
        "    option redispatch",
        "frontend stap",
        f"    bind 127.0.0.1:{port}",
        "    default_backend stapsrv",
        "backend stapsrv",
        "    balance leastconn",
        # Towards the instances HAProxy connects from another loopback
        # address than the clients' 127.0.0.1, so the two can be told apart.
        f"    source {PROXY_SOURCE}",
    ]
    if any(backend.health_port for backend in backends):
        lines += ["    option httpchk GET /healthz", "    http-check expect status 200"]
    lines.append(f"    default-server inter {interval_ms} fall 2 rise 2 send-proxy")
    for backend in backends:
        check = f" check port {backend.health_port}" if backend.health_port else " check"
        lines.append(f"    server {backend.name} 127.0.0.1:{backend.port}{check}")
    return "\n".join(lines) + "\n"


def relay_config(server_port: int, routes: Sequence[tuple[int, str]],
                 admin_socket: Path) -> str:
    """A plain TCP relay, no PROXY header: for each ``(port, source)``,
    connections to ``127.0.0.1:port`` reach the server at
    ``127.0.0.1:server_port`` from ``source``, so that a real client, which
    always connects from 127.0.0.1, is another loopback address to the
    server."""
    lines = ["global", f"    stats socket {admin_socket} mode 600 level admin",
             "    maxconn 2000", "defaults", "    mode tcp", "    timeout connect 10s",
             "    timeout client 20m", "    timeout server 20m"]
    for port, source in routes:
        name = source.replace(".", "_")
        lines += [f"listen from_{name}", f"    bind 127.0.0.1:{port}", f"    source {source}",
                  f"    server stapsrv 127.0.0.1:{server_port}"]
    return "\n".join(lines) + "\n"


class HAProxy:
    def __init__(self, directory: Path, backends: Sequence[Backend],
                 config: str | None = None) -> None:
        """``config``: this configuration instead of :func:`haproxy_config`'s
        (it must have the admin socket ``directory/admin.sock``)."""
        self.program = require_program("haproxy")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.admin_socket = directory / "admin.sock"
        self.config_path = directory / "haproxy.cfg"
        self.config_path.write_text(config if config is not None else
                                    haproxy_config(self.port, backends, self.admin_socket))
        self.log_path = directory / "haproxy.out"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> HAProxy:
        check = subprocess.run([self.program, "-c", "-f", str(self.config_path)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise AssertionError(f"haproxy -c refused the configuration:\n{check.stdout}"
                                 f"{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.program, "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.admin_socket.exists():
                try:
                    self.command("show info")
                    return self
                except OSError:
                    pass
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError("haproxy did not start:\n" + self.log_path.read_text())

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
            admin.settimeout(5)
            admin.connect(str(self.admin_socket))
            admin.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                chunk = admin.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, str]:
        """Each backend server's status as HAProxy sees it (UP, DOWN, ...)."""
        text = self.command("show stat")
        header, *rows = [line for line in text.splitlines() if line.strip()]
        names = header.lstrip("# ").split(",")
        states = {}
        for row in rows:
            values = dict(zip(names, row.split(",")))
            if values.get("pxname") == "stapsrv" and values.get("svname") not in (
                    "FRONTEND", "BACKEND"):
                states[values["svname"]] = values["status"].split(" ")[0]
        return states

    def wait_for_state(self, name: str, state: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.states().get(name) == state:
                return
            time.sleep(0.1)
        raise AssertionError(f"haproxy never saw {name} {state}: {self.states()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_haproxy(test: object, directory: Path, backends: Sequence[Backend]) -> HAProxy:
    proxy = HAProxy(directory, backends)
    test.addCleanup(proxy.stop)  # type: ignore[attr-defined]
    return proxy.start()
