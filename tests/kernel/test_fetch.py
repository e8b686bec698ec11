"""What the fetcher reads from apt and which releases it may fetch (the
fetch itself is tested against the real archive in tests/system/test_kernels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from stapsrv.kernel.fetch import (
    APT_CACHE,
    APT_GET,
    IMAGES_DIRECTORY,
    FetchFailed,
    KernelFetcher,
    allowed,
    build_packages,
    default_patterns,
    parse_show,
)
from stapsrv.kernel.store import KernelStore

SHOW = """Package: linux-headers-6.1.0-55-amd64
Source: linux (6.1.192-1)
Version: 6.1.192-1
Depends: linux-headers-6.1.0-55-common (= 6.1.192-1), linux-kbuild-6.1 (>= 6.1.192-1), linux-compiler-gcc-12-x86
Size: 1841140
Description: Header files for Linux 6.1.0-55-amd64
 This package provides the architecture-specific kernel header files
 Version: not a field

Package: linux-kbuild-6.1
Version: 6.1.192-3
Depends: libc6 (>= 2.34)
Size: 1567812
"""


class AptTests(TestCase):
    def test_show_stanzas(self) -> None:
        headers, kbuild = parse_show(SHOW)
        self.assertEqual((headers.name, headers.version, headers.size),
                         ("linux-headers-6.1.0-55-amd64", "6.1.192-1", 1841140))
        self.assertEqual((kbuild.name, kbuild.version), ("linux-kbuild-6.1", "6.1.192-3"))
        self.assertEqual(build_packages(headers),
                         ["linux-headers-6.1.0-55-common", "linux-kbuild-6.1"])
        self.assertEqual(parse_show(""), [])


class PolicyTests(TestCase):
    def test_default_is_the_servers_series_and_architecture(self) -> None:
        patterns = default_patterns("amd64", ["6.1.0-56-amd64", "6.1.0-57-amd64",
                                              "6.18.44-fc-v657"])
        self.assertEqual(patterns, ("6.1.0-*-amd64", "6.1.0-*-cloud-amd64",
                                    "6.1.0-*-rt-amd64"))
        self.assertTrue(allowed("6.1.0-55-amd64", patterns))
        self.assertTrue(allowed("6.1.0-57-cloud-amd64", patterns))
        self.assertFalse(allowed("5.10.0-30-amd64", patterns))
        self.assertFalse(allowed("6.1.0-55-arm64", patterns))
        self.assertEqual(default_patterns("arm64", ["6.1.0-3-arm64"])[0], "6.1.0-*-arm64")

    def test_names_that_are_not_releases_are_never_fetched(self) -> None:
        for name in ("-oDebug::pkgProblemResolver=1", "../x-amd64", "6.1.0-1-amd64 x"):
            self.assertFalse(allowed(name, ("*",)), name)


class ImageFetcher(KernelFetcher):
    """A fetcher whose child processes are recorded and faked: the
    "download" writes a .deb, the "unpack" writes the vmlinuz."""

    def __init__(self, *args: Any, split: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[list[str]] = []
        #: Forky's packaging: the image in linux-binary-<release>.
        self.split = split

    async def run(self, argv: Sequence[str], cwd: Path | None = None) -> tuple[bytes, bytes, int]:
        self.commands.append(list(argv))
        if argv[0].endswith("apt-cache") and argv[-1].startswith("linux-binary-") \
                and not self.split:
            return b"", b"E: No packages found\n", 100
        if argv[0].endswith("apt-cache"):
            return (f"Package: {argv[-1]}\nVersion: 6.1.192-3\nSize: 70000000\n".encode(),
                    b"", 0)
        if argv[0].endswith("apt-get"):
            assert cwd is not None
            (cwd / "linux-image_6.1.192-3_amd64.deb").write_bytes(b"deb")
            return b"", b"", 0
        if argv[0] == "/bin/sh":
            directory, member = Path(argv[5]), argv[7]
            (directory / Path(member).name).write_bytes(b"MZ kernel")
            return b"", b"", 0
        raise AssertionError(f"unexpected command {argv}")


class ImageTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.pool = ThreadPool(0, 2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = KernelStore(self.base / "kernels", 10 << 20)
        self.store.open()
        self.boot = self.base / "boot"
        self.boot.mkdir()

    def fetcher(self) -> ImageFetcher:
        return ImageFetcher(self.store, reactor, self.pool, ("*",), boot=self.boot)

    async def test_the_machines_own_image_first(self) -> None:
        (self.boot / "vmlinuz-6.1.0-57-amd64").write_bytes(b"MZ")
        fetcher = self.fetcher()
        self.assertEqual(await fetcher.ensure_image("6.1.0-57-amd64"),
                         self.boot / "vmlinuz-6.1.0-57-amd64")
        self.assertEqual(fetcher.commands, [])

    async def test_fetched_once_into_the_store(self) -> None:
        fetcher = self.fetcher()
        first, second = await gatherResults([
            Deferred.fromCoroutine(fetcher.ensure_image("6.1.0-55-amd64")),
            Deferred.fromCoroutine(fetcher.ensure_image("6.1.0-55-amd64"))])
        self.assertEqual(first, second)
        self.assertEqual(first, self.store.directory / IMAGES_DIRECTORY / "6.1.0-55-amd64" /
                         "root" / "vmlinuz-6.1.0-55-amd64")
        self.assertEqual(first.read_bytes(), b"MZ kernel")
        self.assertEqual([argv[0] for argv in fetcher.commands],
                         [APT_CACHE, APT_CACHE, APT_GET, "/bin/sh"])
        self.assertIn("linux-binary-6.1.0-55-amd64", fetcher.commands[0])
        self.assertIn("linux-image-6.1.0-55-amd64=6.1.192-3", fetcher.commands[2])
        # Kept: a new fetcher (a new server) finds it without fetching.
        again = self.fetcher()
        self.assertEqual(await again.ensure_image("6.1.0-55-amd64"), first)
        self.assertEqual(again.commands, [])
        # Nothing of the download is left; the trees are not touched.
        self.assertEqual(sorted(p.name for p in first.parent.iterdir()), [first.name])
        self.assertEqual(self.store.releases(), [])

    async def test_the_image_of_a_split_package(self) -> None:
        """Forky's linux-image-<release> holds no image: it is taken from
        linux-binary-<release>."""
        fetcher = ImageFetcher(self.store, reactor, self.pool, ("*",), boot=self.boot,
                               split=True)
        image = await fetcher.ensure_image("7.2.12+deb14-amd64")
        self.assertEqual(image.read_bytes(), b"MZ kernel")
        self.assertEqual([argv[0] for argv in fetcher.commands], [APT_CACHE, APT_GET, "/bin/sh"])
        self.assertIn("linux-binary-7.2.12+deb14-amd64=6.1.192-3", fetcher.commands[1])
        self.assertEqual(fetcher.commands[2][-1], "./usr/lib/modules/7.2.12+deb14-amd64/vmlinuz")
        self.assertEqual(image.name, "vmlinuz-7.2.12+deb14-amd64")

    async def test_bad_names_are_never_fetched(self) -> None:
        fetcher = self.fetcher()
        with self.assertRaises(FetchFailed):
            await fetcher.ensure_image("../x-amd64")
        self.assertEqual(fetcher.commands, [])


ARM64_SHOW = """Package: linux-headers-6.1.0-57-arm64
Version: 6.1.192-3
Depends: linux-headers-6.1.0-57-common (= 6.1.192-3), linux-kbuild-6.1 (>= 6.1.192-3), linux-compiler-gcc-12-arm
Size: 1000
"""


class ForeignFetcher(KernelFetcher):
    """apt-cache answers recorded with the configuration they went through."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[list[str]] = []

    async def run(self, argv: Sequence[str], cwd: Path | None = None) -> tuple[bytes, bytes, int]:
        self.commands.append(list(argv))
        names = [word for word in argv[argv.index("--no-all-versions") + 1:]]
        if names == ["linux-headers-6.1.0-57-arm64"]:
            return ARM64_SHOW.encode(), b"", 0
        return "".join(f"Package: {name}\nVersion: 6.1.192-3\nSize: 5\n\n"
                       for name in names).encode(), b"", 0


class ForeignArchitectureTests(TestCase):
    async def test_headers_through_their_apt_kbuild_through_the_hosts(self) -> None:
        from stapsrv.core.aptsources import parse_suites
        from stapsrv.kernel.privateapt import PrivateApt

        base = Path(self.mktemp()).absolute()
        arm64 = PrivateApt(base / ".apt-arm64", parse_suites(["bookworm"]), "arm64")
        fetcher = ForeignFetcher(KernelStore(base, 10 << 20), reactor, ThreadPool(0, 1),
                                 ("*",), foreign={"arm64": arm64})
        found = await fetcher.resolve("6.1.0-57-arm64")
        self.assertEqual([(p.name, p.via) for p in found],
                         [("linux-headers-6.1.0-57-arm64", "arm64"),
                          ("linux-headers-6.1.0-57-common", "arm64"),
                          ("linux-kbuild-6.1", None)])
        through = {tuple(argv[argv.index("--no-all-versions") + 1:]): argv[1:3]
                   for argv in fetcher.commands}
        config = ["-c", str(arm64.config_file)]
        self.assertEqual(through, {("linux-headers-6.1.0-57-arm64",): config,
                                   ("linux-headers-6.1.0-57-common",): config,
                                   ("linux-kbuild-6.1",): ["show", "--no-all-versions"]})
        # An amd64 release on the same fetcher: the host's apt only.
        self.assertIsNone(fetcher.via("6.1.0-57-amd64"))
        self.assertEqual(fetcher.via("6.1.0-57-arm64"), "arm64")
