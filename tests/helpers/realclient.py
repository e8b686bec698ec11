"""Test cases with the real stap client against stapsrv servers run as
the test user."""

from __future__ import annotations


from tests.helpers import require_header_release, require_program
from tests.helpers.realserver import (
    CLIENT_48,
    Client,
    ClientKind,
    ServerProcess,
    remove_tree,
    scratch_directory,
    start_stapsrv,
)


HELLO = 'probe begin { println("hi"); exit() }'


class RealClientMixin:
    timeout = 900
    #: The client the tests run.
    kind: ClientKind = CLIENT_48

    def setUp(self) -> None:
        require_program("stap")
        require_program("certutil")
        self.kind.require()
        self.release = require_header_release()

    def new_client(self) -> Client:
        base = scratch_directory("client-")
        self.addCleanup(remove_tree, base)  # type: ignore[attr-defined]
        return Client(base, self.kind)

    def own_server(self, *arguments: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = start_stapsrv(arguments, release=self.release, env=env)
        self.addCleanup(remove_tree, server.base)  # type: ignore[attr-defined]
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        return server

    async def trusted_client(self, server: ServerProcess) -> Client:
        client = self.new_client()
        await client.trust(server.spec)
        return client


async def run_p2_sample(client: Client, server: ServerProcess, release: str):  # type: ignore[no-untyped-def]
    """The -p2 sample of protocol.md 4.3: script file, -I tree, -D, arguments."""
    project = client.dir / "proj"
    tapsets = project / "mytapset"
    tapsets.mkdir(parents=True, exist_ok=True)
    (tapsets / "my.stp").write_text(
        'function mytap_hello:string (who:string) { return "hello " . who }\n')
    (project / "hello.stp").write_text(
        'probe begin { printf("%s\\n", mytap_hello(@1)); exit() }\n')
    return await client.stap(
        f"--use-server={server.spec}", "-r", release, "-p2", "-I", str(tapsets),
        "-D", "FOO=1", str(project / "hello.stp"), "world")
