"""One client address cannot make others wait (#28 item 2), with the real
server and client: a second release asked for while the first is being
fetched is refused at once with one clear line.  Nothing is downloaded:
apt goes through a proxy that accepts and never answers, so the first
fetch is under way for as long as the test keeps that connection open."""

from __future__ import annotations

import socket

from twisted.internet.defer import race
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.helpers.archive_releases import cloud_release, older_abi_release
from tests.helpers.realclient import HELLO, RealClientMixin
from tests.helpers.realserver import owned_directory, remove_tree, scratch_directory


class PeerFetchesTests(RealClientMixin, TestCase):
    async def test_a_second_release_waits_for_the_first_fetch_of_its_address(self) -> None:
        older, cloud = older_abi_release(), cloud_release()
        base = scratch_directory("budget-")
        self.addCleanup(remove_tree, base)
        store = owned_directory(base / "store")
        proxy = socket.socket()
        self.addCleanup(proxy.close)
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(8)
        proxy.settimeout(600)
        config = base / "apt.conf"
        config.write_text(f'Acquire::http::Proxy "http://127.0.0.1:{proxy.getsockname()[1]}/";\n'
                          'Acquire::Retries "0";\nAcquire::http::Timeout "900";\n')
        config.chmod(0o644)
        server = self.own_server("--kernel-store", str(store), "--no-fetch-symbols",
                                 env={"APT_CONFIG": str(config)})
        first_client = await self.trusted_client(server)
        first = first_client.stap(
            f"--use-server={server.spec}", "-r", older, "-p4", "-e", HELLO)
        # apt's download has reached the proxy: the fetch is under way.
        connection, _ = await deferToThread(proxy.accept)
        try:
            second_client = await self.trusted_client(server)
            # Should the budget not hold, the second fetch reaches the proxy
            # too (and its answer would wait for it): that fails at once.
            second_fetch = deferToThread(proxy.accept)
            second_fetch.addErrback(lambda failure: None)
            which, result = await race([
                second_client.stap(f"--use-server={server.spec}", "-r", cloud, "-p4", "-e",
                                   HELLO), second_fetch])
            if which == 1:
                result[0].close()
                self.fail(f"a fetch of {cloud} was started while {older} was being fetched")
            out, err, code = result
            self.assertEqual(code, 1)
            self.assertRegex(
                err.decode(), rf"Server: Not starting the fetch of kernel release '{cloud}' "
                r"for [0-9a-f.:]+ now: .* has the fetch of kernel release "
                rf"'{older}' under way\.  Try again once that is done")
            self.assertFalse(first.called, "the first fetch is still under way")
        finally:
            connection.close()
            proxy.shutdown(socket.SHUT_RDWR)  # wakes any accept still waiting
            proxy.close()
        out, err, code = await first
        self.assertEqual(code, 1)
        self.assertIn(f"Server: Cannot build for kernel release '{older}': downloading "
                      f"kernel {older} failed", err.decode())
        log = server.log()
        self.assertEqual(log.count("Fetching kernel "), 1, log)
        self.assertIn(f"Fetching kernel {older}", log)
