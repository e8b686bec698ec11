"""A real ``redis-server`` for the fleet cache tests: loopback only, no
persistence, on a free port that survives a stop and a restart; with a
password and TLS (a throwaway CA and certificate for 127.0.0.1) when asked."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import require_program


@frozen
class TlsFiles:
    """PEM files: the CA clients trust, and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_files(directory: Path, address: str = "127.0.0.1") -> TlsFiles:
    """A new CA and a certificate it signed for ``address`` (mode 0644 files,
    the key 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("stapsrv test CA"))
          .issuer_name(_name("stapsrv test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(address))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(directory / "ca.pem", directory / "redis.pem", directory / "redis.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    files.key.chmod(0o600)
    for path in (files.ca, files.cert):
        path.chmod(0o644)
    return files


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers_ping(port: int, ca: Path | None) -> bool:
    """Whether Redis answers PING (or asks for the password first)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as plain:
            connection = plain
            if ca is not None:
                context = ssl.create_default_context(cafile=str(ca))
                connection = context.wrap_socket(plain, server_hostname="127.0.0.1")
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """``redis-server`` in the foreground on 127.0.0.1:``port``."""

    def __init__(self, directory: Path, port: int | None = None, password: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.program = require_program("redis-server")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "redis.log"

    @property
    def url(self) -> str:
        """The URL a server uses (the password is not in it)."""
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client_options(self) -> dict[str, object]:
        """Keyword arguments of ``redis.Redis`` for a test's own connection."""
        options: dict[str, object] = {"host": "127.0.0.1", "port": self.port,
                                      "password": self.password}
        if self.tls is not None:
            options |= {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
        return options

    def _arguments(self) -> list[str]:
        words = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--dir", str(self.directory), "--protected-mode", "yes"]
        if self.tls is None:
            words += ["--port", str(self.port)]
        else:
            words += ["--port", "0", "--tls-port", str(self.port),
                      "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                      "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        return words

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """Start (or start again, on the same port) and wait for PONG."""
        assert not self.running, "already running"
        # The password goes in on standard input (a configuration file "-"),
        # so that it is never on a command line either.
        config = b"" if self.password is None else f"requirepass {self.password}\n".encode()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.program, "-", *self._arguments()],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        assert self.process.stdin is not None
        self.process.stdin.write(config)
        self.process.stdin.close()
        ca = self.tls.ca if self.tls is not None else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _answers_ping(self.port, ca):
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"redis-server on port {self.port} did not start:\n"
                             + self.log_path.read_text(errors="replace"))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait until the port is closed."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        self.process = None


def start_redis(test: object, directory: Path, password: str | None = None,
                tls: TlsFiles | None = None) -> RedisServer:
    """A running Redis stopped in ``test``'s cleanup."""
    server = RedisServer(directory, password=password, tls=tls)
    test.addCleanup(server.stop)  # type: ignore[attr-defined]
    return server.start()
