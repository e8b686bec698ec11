"""What a client's compile can reach, with the real client against real
servers: the server's secrets stay out of every answer, and one client's
request does not change another's.

Each attack is also run against a server started with ``--no-sandbox``
where that shows the exposure the sandbox removes (so the check itself is
known to see a leak when there is one).
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers import require_program
from tests.helpers.rawclient import basic_request, build_request, parse_response, send_request
from tests.helpers.realclient import RealClientMixin
from tests.helpers.realserver import (
    ServerProcess,
    generate_server_mok,
    owned_directory,
    remove_tree,
    scratch_directory,
    test_user,
)

#: How long a run of a secret may appear in an answer.
RUN = 64


def leaked(secret: bytes, answer: bytes) -> list[bytes]:
    """Lines (16 bytes or more) and ``RUN``-byte runs of ``secret`` found in
    ``answer``."""
    found = [line for line in secret.splitlines() if len(line) >= 16 and line in answer]
    found += [secret[i:i + RUN] for i in range(0, max(len(secret) - RUN, 0) + 1, 8)
              if secret[i:i + RUN] in answer]
    return found


class IsolatedServerMixin(RealClientMixin):
    def isolated_server(self, *arguments: str) -> tuple[ServerProcess, Path]:
        """A server with a SYSTEMTAP_DIR (translator cache, MOKs) of its own."""
        systemtap_dir = owned_directory(scratch_directory("isolation-") / "systemtap")
        self.addCleanup(remove_tree, systemtap_dir.parent)  # type: ignore[attr-defined]
        server = self.own_server(*arguments, env={"SYSTEMTAP_DIR": str(systemtap_dir)})
        return server, systemtap_dir


class SecretsMixin(IsolatedServerMixin):
    """A server with a MOK and a canary in its user's home; clients keep
    everything the server sends (``-k``, their own TMPDIR)."""

    def start(self, *arguments: str) -> ServerProcess:
        server, systemtap_dir = self.isolated_server(*arguments)
        mok_dir = generate_server_mok(systemtap_dir)
        home = Path(test_user().pw_dir)
        canary = home / f"stapsrv-canary-{server.port}"
        canary.write_text("".join(f"stapsrv home canary line {i} {os.urandom(12).hex()}\n"
                                  for i in range(8)))
        os.chown(canary, test_user().pw_uid, test_user().pw_gid)
        canary.chmod(0o600)
        self.addCleanup(canary.unlink)  # type: ignore[attr-defined]
        self.secrets = {
            "server key": server.base / "ssl" / "stap-key.pem",
            "MOK key": mok_dir / "signing_key.priv",
            "home canary": canary,
        }
        return server

    async def answer_to(self, server: ServerProcess, *arguments: str) -> bytes:
        """Everything the client printed and kept of ``arguments``' answer."""
        client = await self.trusted_client(server)
        tmp = owned_directory(client.dir / "tmp")
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, "-k", *arguments,
            env={"TMPDIR": str(tmp)})
        blob = out + err
        for path in [*client.cwd.rglob("*"), *tmp.rglob("*")]:
            if path.is_file() and not path.is_symlink():
                blob += path.read_bytes()
        return blob

    def leaks(self, answer: bytes) -> dict[str, list[bytes]]:
        found = {}
        for name, path in self.secrets.items():
            runs = leaked(path.read_bytes(), answer)
            if runs:
                found[name] = runs
        return found


def attacks(secret: Path) -> list[list[str]]:
    """Ways a script names a server file for the compiler to read."""
    return [
        ["-g", "-p4", "-e", f'%{{ asm(".incbin \\"{secret}\\""); %}} probe begin {{ exit() }}'],
        ["-g", "-p4", "-e", f'%{{\n#include "{secret}"\n%}} probe begin {{ exit() }}'],
        ["-p4", "-e", f'probe begin {{ println(@cast(0, "struct x", "<{secret}>")->y); '
                      "exit() }"],
    ]


class SecretTests(SecretsMixin, TestCase):
    async def test_no_answer_holds_any_secret(self) -> None:
        server = self.start()
        for name, secret in self.secrets.items():
            for arguments in attacks(secret):
                answer = await self.answer_to(server, *arguments)
                self.assertEqual(self.leaks(answer), {}, f"{name}: {arguments}")
        self.assertIn("Translators run in a bubblewrap sandbox", server.log())

    async def test_without_the_sandbox_the_key_leaks(self) -> None:
        """The exposure of stap-serverd 4.8, which --no-sandbox keeps."""
        server = self.start("--no-sandbox")
        [incbin, _, cast] = attacks(self.secrets["server key"])
        self.assertIn("server key", self.leaks(await self.answer_to(server, *incbin)))
        self.assertIn("server key", self.leaks(await self.answer_to(server, *cast)))
        self.assertIn("Translator sandbox disabled (--no-sandbox)", server.log())


#: The layout a fake <netinet/in.h> gives ``struct sockaddr_in``.
_FAKE_HEADER = "struct sockaddr_in { char stapsrv_padding[200]; unsigned short sin_port; };\n"
_CAST = ('probe begin { printf("%d\\n", &@cast(0, "struct sockaddr_in", '
         '"<netinet/in.h>")->sin_port); exit() }')


class PoisonTests(IsolatedServerMixin, TestCase):
    """The translator looks up an @cast header in its working directory
    (the request's) first, and 4.8 keeps what it found in a cache every
    later client uses.  A request may not carry such a header, and what a
    request compiles stays in its own translator cache."""

    async def generated_c(self, server: ServerProcess, *arguments: str) -> bytes:
        client = await self.trusted_client(server)
        out, err, code = await client.stap(
            f"--use-server={server.spec}", "-r", self.release, *arguments, "-p3", "-e", _CAST)
        self.assertEqual(code, 0, err.decode())
        return out

    async def poison(self, server: ServerProcess) -> None:
        """A crafted request with its own netinet/in.h beside its arguments,
        and a real client with one in its -I tree."""
        members = basic_request(_CAST, release=self.release, args=("-p3",),
                                extra={"netinet/": "", "netinet/in.h": _FAKE_HEADER})
        result = await deferToThread(send_request, server.port, server.base / "ssl" / "stap.cert",
                                     build_request(members))
        response = parse_response(result.data)
        self.assertEqual(response.rc, 1)
        self.assertIn("Server: The request holds 'netinet/', which is not one of the request "
                      "members this server accepts", response.stderr)
        poisoner = self.new_client()
        headers = poisoner.dir / "poison"
        (headers / "netinet").mkdir(parents=True)
        (headers / "netinet" / "in.h").write_text(_FAKE_HEADER)
        (headers / "poison.stp").write_text("function poison() { return 1 }\n")
        await self.generated_c(server, "-I", str(headers))

    async def test_a_request_header_does_not_reach_other_clients(self) -> None:
        require_program("gcc")
        server, systemtap_dir = self.isolated_server()
        await self.poison(server)
        victim = await self.generated_c(server)
        fresh = await self.generated_c(self.isolated_server()[0])
        self.assertEqual(victim, fresh)
        self.assertEqual(list((systemtap_dir / "cache").rglob("typequery_*")), [],
                         "no request's type query reached the server's own cache")

    async def test_without_the_sandbox_the_cache_is_shared(self) -> None:
        """--no-sandbox keeps 4.8's shared translator cache (only the member
        check stands between a request and the next client)."""
        server, systemtap_dir = self.isolated_server("--no-sandbox")
        await self.poison(server)
        self.assertNotEqual(list((systemtap_dir / "cache").rglob("typequery_*")), [])
