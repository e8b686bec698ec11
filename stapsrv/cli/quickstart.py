"""``make serve``: one server in the foreground with a built-in configuration.

It serves the newest kernel release whose build tree is installed (the
running one has none on a typical build host), logs to standard output in
4.8's format, and once listening prints the commands a client needs.
"""

from __future__ import annotations

import argparse
import sys

from twisted.application.service import MultiService
from twisted.logger import globalLogBeginner

from stapsrv.app.logs import CtimeLogObserver
from stapsrv.app.publish import publisher_service
from stapsrv.app.service import CompileServerService
from stapsrv.config.convert import server_config
from stapsrv.paths import MODULES, RootRefused, installed_releases, refuse_root
from stapsrv.reactor import installed_reactor


def client_instructions(port: int, release: str) -> str:
    server = f"127.0.0.1:{port}"
    return "\n".join([
        "",
        f"stapsrv is serving kernel {release} on port {port}.  From any user:",
        "",
        "    export SYSTEMTAP_DIR=$(mktemp -d)",
        f"    stap --use-server={server} --trust-servers=ssl,no-prompt",
        f"    stap --use-server={server} -r {release} -p4 -e 'probe begin {{ println(\"hi\"); exit() }}'",
        "",
        "and find stap_*.ko in the current directory.  Stop the server with Ctrl-C.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--listen", default="::")
    options = parser.parse_args(argv)
    try:
        refuse_root()
    except RootRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    releases = installed_releases()
    if not releases:
        print(f"No kernel build tree under {MODULES}: run 'make setup' first.", file=sys.stderr)
        return 1
    release = releases[-1]
    config = server_config(releases=[release], port=options.port, listen=options.listen)
    reactor = installed_reactor()
    globalLogBeginner.beginLoggingTo([CtimeLogObserver(sys.stdout)],
                                     redirectStandardIO=False)
    top = MultiService()
    server = CompileServerService(config, reactor)
    server.setServiceParent(top)
    publisher_service(server, reactor, enabled=True).setServiceParent(top)

    def start() -> None:
        try:
            top.startService()
        except Exception as exc:  # a start that fails must say why and end
            print(f"stapsrv could not start: {exc}", file=sys.stderr)
            reactor.stop()
            return
        print(client_instructions(server.port_number, release), flush=True)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
