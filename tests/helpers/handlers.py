"""Request handlers over the fake translator (and over a disk cache), for
tests that answer requests for real."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

from attrs import evolve
from twisted.internet import reactor as global_reactor
from twisted.logger import ILogObserver, LogEvent, Logger, formatEvent
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from stapsrv.cache.key import ContentDigests, KeyMaker
from stapsrv.cache.store import DiskCache
from stapsrv.compile.context import RequestContext
from stapsrv.compile.handler import RequestHandler
from stapsrv.config.values import ServerConfig
from stapsrv.core.cmdline import ServerOption
from stapsrv.identity.certs import ServerIdentity
from stapsrv.reactor import IHandlerReactor
from tests.helpers import install_fake_stap, test_identity
from tests.helpers.archives import RELEASE
from tests.helpers.vectors import members

#: The reactor, as the handler and the cache see it.
reactor = cast(IHandlerReactor, global_reactor)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is as good as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class HandlerCase(TestCase):
    """A handler with the fake translator; requests answered for real."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.tmpdir = self.base / "tmp"
        self.tmpdir.mkdir(parents=True)
        self.home = self.base / "home"
        self.home.mkdir()
        self.record = self.base / "record.json"
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.options: tuple[ServerOption, ...] = ()
        self.keep = False

    def handler(self, **config: Any) -> RequestHandler:
        settings = evolve(ServerConfig(
            releases=(RELEASE, "6.18.44-fc-v657"), ssl_dir=self.base / "ssl",
            stap=str(install_fake_stap(self.base)), tmpdir=self.tmpdir,
            server_options=self.options, keep_temporary=self.keep), **config)
        environ = {"PATH": os.environ["PATH"], "HOME": str(self.home),
                   "FAKESTAP_RECORD": str(self.record), "LD_PRELOAD": ""}
        return RequestHandler(settings, reactor, self.pool, test_identity,
                              {RELEASE: "/fixed/runtime"}, environ)

    async def answer(self, body: bytes, handler: RequestHandler | None = None) -> dict[str, bytes]:
        response = await (handler or self.handler()).handle(body, RequestContext("peer"))
        assert response is not None
        return members(response)

    def recorded(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.record.read_text()))


KEY_A = "a" * 64
KEY_B = "b" * 64


@implementer(ILogObserver)
class Events:
    """A log observer keeping what was logged, as text."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines() if text in line]


class CachedHandlerCase(HandlerCase):
    """A handler with a disk cache, a key maker over temporary server-side
    files (runtime, kernel build tree, rc), and a fake translator that
    counts its runs."""

    def setUp(self) -> None:
        super().setUp()
        self.stap = install_fake_stap(self.base)
        self.count_file = self.base / "count"
        self.cache_dir = self.base / "cache"
        self.runtime = self.base / "runtime"
        (self.runtime / "linux").mkdir(parents=True)
        (self.runtime / "runtime.h").write_text("#define STP_RUNTIME 1\n")
        (self.runtime / "linux" / "print.c").write_text("/* print */\n")
        self.modules_root = self.base / "modules"
        build = self.modules_root / RELEASE / "build"
        (build / "include" / "generated").mkdir(parents=True)
        (build / "include" / "generated" / "utsrelease.h").write_text(
            f'#define UTS_RELEASE "{RELEASE}"\n')
        (build / ".config").write_text("CONFIG_MODULES=y\nCONFIG_KPROBES=y\n")
        self.build = build
        self.rc = self.base / "rc"
        self.server_identity: ServerIdentity = test_identity()
        self.sleep: float | None = None
        self.cache_log = Events()

    def cached_handler(self, max_bytes: int = 1 << 24, cache_dir: Path | None = None,
                       cache: Any = None, **config: Any) -> RequestHandler:
        """A fresh handler over the cache directory (a new server, same files)."""
        settings = evolve(ServerConfig(
            releases=(RELEASE, "6.18.44-fc-v657"), ssl_dir=self.base / "ssl",
            stap=str(self.stap), tmpdir=self.tmpdir, server_options=self.options,
            keep_temporary=self.keep), **config)
        environ = {"PATH": os.environ["PATH"], "HOME": str(self.home),
                   "FAKESTAP_RECORD": str(self.record), "FAKESTAP_COUNT": str(self.count_file),
                   "LD_PRELOAD": ""}
        if self.sleep is not None:
            environ["FAKESTAP_SLEEP"] = str(self.sleep)
        if cache is None:
            cache = DiskCache(cache_dir or self.cache_dir, max_bytes, reactor, self.pool,
                              Logger(observer=self.cache_log))
        keys = KeyMaker(stap=str(self.stap), modules_root=self.modules_root,
                        environ={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
                        rc_file=self.rc, digests=ContentDigests(recheck=0))
        return RequestHandler(settings, reactor, self.pool,
                              lambda: self.server_identity, {RELEASE: str(self.runtime)},
                              environ, cache=cache, keys=keys)

    async def raw(self, handler: RequestHandler, body: bytes) -> bytes:
        response = await handler.handle(body, RequestContext("peer"))
        assert response is not None
        return response

    def runs(self) -> int:
        """How many times the translator ran."""
        try:
            return len(self.count_file.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def entries(self) -> list[Path]:
        if not self.cache_dir.exists():
            return []
        return sorted(p for p in self.cache_dir.rglob("*") if p.is_file())

    def assertGoodModule(self, response: bytes) -> dict[str, bytes]:
        found = members(response)
        self.assertEqual(found["rc"], b"0")
        self.assertTrue(found["stap000000/stap_fake_1.ko"].startswith(b"\x7fELF fake module"))
        return found
