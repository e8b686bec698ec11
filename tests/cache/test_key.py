"""Cache keys (stapsrv.cache.key): every part that can change an answer
changes the key, and nothing else does.  Unit tests of the request
summary, the content digests and the key maker, then the same parts end
to end through the handler with a counting fake translator."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
import threading
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import PKCS1v15
from cryptography.hazmat.primitives.hashes import SHA256
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from stapsrv.cache.key import (
    KEY_SECONDS,
    MAX_NAMED_FILES,
    Budget,
    ContentDigests,
    KeyMaker,
    Uncacheable,
)
from stapsrv.compile.archive import RequestRejected
from stapsrv.compile.job import Job, needs_signature, parse_job
from stapsrv.core.cmdline import Privilege, ServerOption
from stapsrv.identity.certs import ServerIdentity, make_certificate
from tests.helpers.archives import RELEASE, make_zip, request
from tests.helpers.handlers import CachedHandlerCase, Events
from tests.helpers.vectors import captured_requests, members

MAX = 1 << 20
SCRIPT_REQUEST = "04-scriptfile-tapsetdir-args"
TAPSET = "tapset/home/user/cli3/tapsets/mytap.stp"
SCRIPT = "script/home/user/cli3/hello.stp"


def replaced(body: bytes, name: str, data: bytes) -> bytes:
    """The archive ``body`` with member ``name``'s bytes replaced (same
    order, names and modes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(body)) as source, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            content = data if info.filename == name else source.read(info)
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr = info.external_attr
            copy.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(copy, content)
    return out.getvalue()


def flip_last_byte(data: bytes) -> bytes:
    return data[:-2] + bytes([data[-2] ^ 0x01]) + data[-1:]


def other_identity() -> ServerIdentity:
    """A second server identity (another key pair and certificate)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ServerIdentity(key, make_certificate(key, "otherhost", datetime.now(timezone.utc)))


class SummaryTests(TestCase):
    """What the key takes from a request archive."""

    def test_same_members_in_another_order_same_digest(self) -> None:
        entries = [("argv1", b"-p4", 0o100644), ("sysinfo", b"sysinfo: r x86_64", 0o100644),
                   ("version", b"4.8", 0o100644)]
        first = parse_job(make_zip(entries), MAX)
        second = parse_job(make_zip(list(reversed(entries))), MAX)
        self.assertEqual(first.digest, second.digest)

    def test_every_member_byte_counts(self) -> None:
        body = captured_requests()[SCRIPT_REQUEST]
        base = parse_job(body, MAX).digest
        for name, data in members(body).items():
            if name.endswith("/"):
                continue
            changed = replaced(body, name, flip_last_byte(data + b"\n"))
            self.assertNotEqual(parse_job(changed, MAX).digest, base, name)

    def test_an_extra_empty_directory_counts(self) -> None:
        entries = [("argv1", b"-p4", 0o100644), ("sysinfo", b"sysinfo: r x86_64", 0o100644)]
        with_dir = entries + [("tapset/", b"", 0o40755)]
        self.assertNotEqual(parse_job(make_zip(entries), MAX).digest,
                            parse_job(make_zip(with_dir), MAX).digest)

    def test_names_and_contents_cannot_be_traded(self) -> None:
        one = make_zip([("argv1", b"-p4", 0o100644), ("tapset/a", b"x", 0o100644)])
        two = make_zip([("argv1", b"-p4", 0o100644), ("tapset/ax", b"", 0o100644)])
        self.assertNotEqual(parse_job(one, MAX).digest,
                            parse_job(two, MAX).digest)

    def test_release_privilege_and_mok(self) -> None:
        summary = parse_job(captured_requests()["02-privilege-stapusr"], MAX)
        self.assertEqual(summary.release, RELEASE)
        self.assertEqual(summary.privilege, Privilege.STAPUSR)
        self.assertFalse(summary.wants_mok)
        self.assertTrue(needs_signature(summary))
        plain = parse_job(request("-p4"), MAX)
        self.assertEqual(plain.privilege, Privilege.STAPDEV)
        self.assertFalse(needs_signature(plain))
        for argument, privilege in (("--privilege=stapsys", Privilege.STAPSYS),
                                    ("--unprivileged", Privilege.STAPUSR),
                                    ("--privilege=stapdev", Privilege.STAPDEV)):
            self.assertEqual(parse_job(request(argument), MAX).privilege, privilege)
        moks = make_zip([("argv1", b"-p4", 0o100644),
                         ("sysinfo", b"sysinfo: r x86_64", 0o100644),
                         ("mok_fingerprints", b"ab:cd\n", 0o100644)])
        self.assertTrue(parse_job(moks, MAX).wants_mok)

    def test_missing_sysinfo_has_no_release(self) -> None:
        body = make_zip([("argv1", b"-p4", 0o100644)])
        self.assertIsNone(parse_job(body, MAX).release)

    def test_refused_archives_are_refused_here_too(self) -> None:
        with self.assertRaises(RequestRejected):
            parse_job(b"PK\x03\x04garbage", MAX)
        with self.assertRaises(RequestRejected):
            parse_job(request("-p4", "-e" + "x" * 200), 100)
        with self.assertRaises(RequestRejected):
            parse_job(make_zip([("../evil", b"x", 0o100644)]), MAX)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ContentDigestTests(TestCase):
    """Server-side files are hashed by content and rechecked by stat."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.tree = self.root / "runtime"
        (self.tree / "sub").mkdir(parents=True)
        (self.tree / "a.h").write_text("alpha\n")
        (self.tree / "sub" / "b.c").write_text("beta\n")

    def test_a_change_is_seen_after_recheck_seconds(self) -> None:
        clock = FakeClock()
        digests = ContentDigests(recheck=10.0, clock=clock)
        before = digests.digest(self.tree)
        (self.tree / "sub" / "b.c").write_text("betA\n")
        clock.now += 5
        self.assertEqual(digests.digest(self.tree), before, "not looked at again yet")
        clock.now += 6
        self.assertNotEqual(digests.digest(self.tree), before)

    def test_recheck_zero_sees_every_change(self) -> None:
        digests = ContentDigests(recheck=0)
        before = digests.digest(self.tree)
        (self.tree / "new.h").write_text("")
        after_add = digests.digest(self.tree)
        self.assertNotEqual(after_add, before)
        (self.tree / "new.h").unlink()
        self.assertEqual(digests.digest(self.tree), before, "content, not times, decides")

    def test_change_keeping_size_and_mtime_is_seen(self) -> None:
        """``cp -p``, ``rsync -a``, ``tar x`` and package managers put back a
        file's mtime; a one-byte fix of the same size must still count."""
        digests = ContentDigests(recheck=0)
        path = self.tree / "sub" / "b.c"
        before = digests.digest(self.tree)
        info = path.stat()
        path.write_text("betA\n")
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        self.assertNotEqual(digests.digest(self.tree), before)

    def test_same_content_elsewhere_same_digest(self) -> None:
        copy = self.root / "elsewhere" / "runtime-copy"
        shutil.copytree(self.tree, copy)
        digests = ContentDigests()
        self.assertEqual(digests.digest(copy), digests.digest(self.tree))

    def test_renamed_file_changes_the_digest(self) -> None:
        digests = ContentDigests(recheck=0)
        before = digests.digest(self.tree)
        (self.tree / "a.h").rename(self.tree / "c.h")
        self.assertNotEqual(digests.digest(self.tree), before)

    def test_unchanged_tree_is_not_read_again(self) -> None:
        import stapsrv.cache.key as cachekey
        calls: list[object] = []
        real = cachekey._content

        def counting(entries: Any, budget: Any) -> bytes:
            calls.append(entries)
            return real(entries, budget)

        self.patch(cachekey, "_content", counting)
        digests = ContentDigests(recheck=0)
        digests.digest(self.tree)
        digests.digest(self.tree)
        self.assertEqual(len(calls), 1)

    def test_file_and_missing_path(self) -> None:
        digests = ContentDigests(recheck=0)
        file_digest = digests.digest(self.tree / "a.h")
        (self.root / "copy.h").write_text("alpha\n")
        self.assertEqual(file_digest, digests.digest(self.root / "copy.h"), "by content")
        missing = digests.digest(self.root / "nothing")
        self.assertNotEqual(missing, file_digest)
        (self.root / "nothing").write_text("now here\n")
        self.assertNotEqual(digests.digest(self.root / "nothing"), missing)


class NamedPathTests(TestCase):
    """What a request names is fingerprinted only when that is safe and
    cheap: regular files within a budget, never a device, FIFO, socket or
    pseudo file, never through a link out of the named tree."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.tree = self.root / "tree"
        (self.tree / "sub").mkdir(parents=True)
        (self.tree / "a").write_text("alpha\n")
        (self.tree / "sub" / "b").write_text("beta\n")
        self.digests = ContentDigests(recheck=0)

    def test_devices_are_told_apart_without_being_read(self) -> None:
        zero = self.digests.named_digest(Path("/dev/zero"))
        self.assertEqual(self.digests.named_digest(Path("/dev/zero")), zero)
        self.assertNotEqual(self.digests.named_digest(Path("/dev/urandom")), zero)
        self.assertNotEqual(self.digests.named_digest(Path("/dev/null")), zero)

    def test_fifo_and_socket_are_never_opened(self) -> None:
        tree = Path(tempfile.mkdtemp(prefix="key"))  # short: a socket's path is bounded
        self.addCleanup(shutil.rmtree, tree)
        fifo = tree / "fifo"
        os.mkfifo(fifo)
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(str(tree / "socket"))
        # Opening the FIFO for reading would block until a writer came.
        first = self.digests.named_digest(fifo)
        self.assertEqual(self.digests.named_digest(fifo), first)
        self.digests.named_digest(tree)
        self.assertNotEqual(self.digests.named_digest(tree / "socket"), first)

    def test_pseudo_filesystems_are_not_cacheable(self) -> None:
        for path in ("/proc/self", "/proc/cpuinfo", "/sys/class/net", "/proc"):
            with self.assertRaises(Uncacheable, msg=path) as raised:
                self.digests.named_digest(Path(path))
            self.assertIn("pseudo", raised.exception.reason)

    def test_the_root_is_never_walked_into_proc(self) -> None:
        # No bound on files, none on bytes: the walk itself must stop.
        budget = Budget(threading.Event(), files=10 ** 7, size=0)
        with self.assertRaises(Uncacheable) as raised:
            self.digests.named_digest(Path("/"), budget)
        self.assertIn("pseudo", raised.exception.reason)

    def test_a_link_to_a_pseudo_file_is_not_cacheable(self) -> None:
        (self.root / "self").symlink_to("/proc/self")
        self.assertRaises(Uncacheable, self.digests.named_digest, self.root / "self")

    def test_a_link_out_of_the_tree_is_not_followed(self) -> None:
        (self.tree / "out").symlink_to("/usr")
        with self.assertRaises(Uncacheable) as raised:
            self.digests.named_digest(self.tree)
        self.assertEqual(raised.exception.path, str(self.tree / "out"))

    def test_a_link_inside_the_tree_counts_by_its_text(self) -> None:
        (self.tree / "in").symlink_to("sub/b")
        before = self.digests.named_digest(self.tree)
        (self.tree / "in").unlink()
        (self.tree / "in").symlink_to("a")
        self.assertNotEqual(self.digests.named_digest(self.tree), before)

    def test_a_named_link_is_followed_and_its_target_counts(self) -> None:
        link = self.root / "link"
        link.symlink_to(self.tree / "a")
        before = self.digests.named_digest(link)
        (self.tree / "a").write_text("alpha 2\n")
        changed = self.digests.named_digest(link)
        self.assertNotEqual(changed, before, "the target's bytes")
        (self.root / "same").write_text("alpha 2\n")
        link.unlink()
        link.symlink_to(self.root / "same")
        self.assertNotEqual(self.digests.named_digest(link), changed, "the target's name")

    def test_byte_budget(self) -> None:
        big = self.root / "big"
        big.write_bytes(b"x" * (3 << 20))
        budget = Budget(threading.Event(), size=2 << 20)
        with self.assertRaises(Uncacheable) as raised:
            self.digests.named_digest(big, budget)
        self.assertIn("MiB", raised.exception.reason)
        self.digests.named_digest(big, Budget(threading.Event(), size=4 << 20))

    def test_empty_files_cost_no_bytes(self) -> None:
        for number in range(10):
            (self.tree / f"empty{number}").touch()
        self.digests.named_digest(self.tree, Budget(threading.Event(), size=20))

    def test_file_budget(self) -> None:
        self.assertRaises(Uncacheable, self.digests.named_digest, self.tree,
                          Budget(threading.Event(), files=3))
        self.digests.named_digest(self.tree, Budget(threading.Event(), files=4))

    def test_default_budget_bounds_files(self) -> None:
        huge = self.root / "huge"
        huge.mkdir()
        for number in range(MAX_NAMED_FILES + 1):
            (huge / str(number)).touch()
        self.assertRaises(Uncacheable, self.digests.named_digest, huge)

    def test_deadline(self) -> None:
        clock = FakeClock()
        digests = ContentDigests(recheck=0, clock=clock)
        budget = digests.budget()
        clock.now += KEY_SECONDS + 1
        with self.assertRaises(Uncacheable) as raised:
            digests.named_digest(self.tree, budget)
        self.assertIn("longer than", raised.exception.reason)

    def test_stop_ends_a_digest_being_computed(self) -> None:
        import stapsrv.cache.key as cachekey
        for number in range(50):
            (self.tree / f"f{number}").write_text(str(number))
        read: list[str] = []
        real = cachekey._hash_file

        def stopping_after_one(digest: Any, path: str, budget: Budget) -> None:
            read.append(path)
            self.digests.stop()
            real(digest, path, budget)

        self.patch(cachekey, "_hash_file", stopping_after_one)
        with self.assertRaises(Uncacheable) as raised:
            self.digests.named_digest(self.tree)
        self.assertEqual(raised.exception.reason, "the server is stopping")
        self.assertEqual(len(read), 1)
        self.assertRaises(Uncacheable, self.digests.named_digest, self.tree / "a")

    def test_memo_is_bounded_least_recently_used_first_out(self) -> None:
        digests = ContentDigests(recheck=0, remember=3)
        paths = []
        for number in range(5):
            path = self.root / f"n{number}"
            path.write_text(str(number))
            paths.append(path)
        for path in paths[:3]:
            digests.named_digest(path)
        digests.named_digest(paths[0])  # now the most recently used
        digests.named_digest(paths[3])
        self.assertEqual(len(digests), 3)
        self.assertEqual(sorted(digests._remembered), sorted(
            os.path.realpath(path) for path in (paths[0], paths[2], paths[3])))
        for number in range(100):
            digests.named_digest(self.root / f"new{number}")
        self.assertLessEqual(len(digests), 3)

    def test_missing_paths_are_forgotten(self) -> None:
        for number in range(20):
            self.digests.named_digest(self.root / f"absent{number}")
        self.assertEqual(len(self.digests), 0)
        self.digests.named_digest(self.tree / "a")
        self.assertEqual(len(self.digests), 1)
        (self.tree / "a").unlink()
        self.digests.named_digest(self.tree / "a")
        self.assertEqual(len(self.digests), 0)

    def test_uncacheable_script_form_makes_the_key_raise(self) -> None:
        maker = KeyMaker(stap="/usr/bin/stap", modules_root=self.root, environ={},
                         rc_file=self.root / "rc", digests=self.digests)
        job = parse_job(request("-p4", "-e", 'probe process("ls").begin {}', release="r1"),
                        MAX)
        self.assertIsNotNone(job.uncacheable)
        self.assertRaises(Uncacheable, maker.key, job, "r1", ["stap"], None)


class KeyMakerTests(TestCase):
    """Each input of ``KeyMaker.key`` changes the key on its own."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).absolute()
        self.bin = self.root / "usr" / "bin"
        self.bin.mkdir(parents=True)
        self.stap = self.bin / "stap"
        self.stap.write_text("#!/bin/sh\n")
        share = self.root / "usr" / "share" / "systemtap"
        (share / "tapset").mkdir(parents=True)
        (share / "tapset" / "x.stp").write_text("probe x = y {}\n")
        (share / "runtime").mkdir()
        (share / "runtime" / "r.h").write_text("r\n")
        self.share = share
        self.runtime = self.root / "fixed-runtime"
        shutil.copytree(share / "runtime", self.runtime)
        self.modules = self.root / "modules"
        self.build = self.modules / "r1" / "build"
        (self.build / "include" / "generated").mkdir(parents=True)
        (self.build / ".config").write_text("CONFIG_A=y\n")
        (self.build / "include" / "generated" / "utsrelease.h").write_text('"r1"\n')
        self.rc = self.root / "rc"
        self.environ = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": "/home/x"}
        self.summary = parse_job(request("-p4", release="r1"), MAX)

    def maker(self, **changes: object) -> KeyMaker:
        settings: dict[str, object] = dict(
            stap=str(self.stap), modules_root=self.modules, environ=self.environ,
            rc_file=self.rc, digests=ContentDigests(recheck=0))
        settings.update(changes)
        return KeyMaker(**settings)  # type: ignore[arg-type]

    def key(self, maker: KeyMaker | None = None, summary: Job | None = None,
            release: str = "r1", options: tuple[str, ...] = ("stap", "-R/x"),
            runtime: str | None = None, signers: tuple[bytes, ...] = ()) -> str:
        return (maker or self.maker()).key(summary or self.summary, release, options,
                                           runtime if runtime is not None else str(self.runtime),
                                           signers)

    def test_server_tapset_directory_contents_count(self) -> None:
        """A server -I directory edited in place gives new keys."""
        tapsets = self.root / "site-tapsets"
        tapsets.mkdir()
        (tapsets / "site.stp").write_text("function f() { return 1 }\n")
        maker = self.maker()
        options = ("stap", f"-I{tapsets}")
        before = self.key(maker, options=options)
        self.assertEqual(self.key(maker, options=options), before)
        (tapsets / "site.stp").write_text("function f() { return 2 }\n")
        self.assertNotEqual(self.key(maker, options=options), before)

    def test_request_naming_server_files(self) -> None:
        """A script path or a process("...") binary outside the request is
        fingerprinted; a request naming a huge tree is not cached."""
        target = self.root / "probed"
        target.write_bytes(b"v1")
        summary = parse_job(request("-p4", "-e", f'probe process("{target}").begin {{}}',
                                            release="r1"), MAX)
        self.assertEqual(summary.named_paths, (str(target),))
        maker = self.maker()
        before = self.key(maker, summary)
        target.write_bytes(b"v2")
        self.assertNotEqual(self.key(maker, summary), before)
        huge = self.root / "huge"
        huge.mkdir()
        for number in range(2001):
            (huge / str(number)).touch()
        summary = parse_job(request("-p4", "-I", str(huge), "-e", "x", release="r1"), MAX)
        self.assertRaises(Uncacheable, self.key, maker, summary)

    def test_key_is_stable_and_hex(self) -> None:
        key = self.key()
        self.assertRegex(key, r"^[0-9a-f]{64}$")
        self.assertEqual(self.key(), key)
        self.assertEqual(self.key(self.maker()), key, "a new server agrees")

    def test_request_changes_the_key(self) -> None:
        other = parse_job(request("-p3", release="r1"), MAX)
        self.assertNotEqual(self.key(summary=other), self.key())

    def test_release_changes_the_key(self) -> None:
        self.assertNotEqual(self.key(release="r2"), self.key())

    def test_server_options_change_the_key(self) -> None:
        base = self.key()
        self.assertNotEqual(self.key(options=("stap", "-R/x", "-DA=1")), base)
        self.assertNotEqual(self.key(options=("-R/x", "stap")), base, "order counts")
        self.assertNotEqual(self.key(options=("stap", "-R/x", "")), base)
        self.assertNotEqual(self.key(options=("stap-R/x",)), base)

    def test_relevant_environment_changes_the_key(self) -> None:
        base = self.key()
        for name, value in (("SYSTEMTAP_DEBUGINFO_PATH", "/x"), ("KBUILD_VERBOSE", "1"),
                            ("ARCH", "arm64"), ("CC", "clang"), ("LC_ALL", "C")):
            self.assertNotEqual(self.key(self.maker(environ=dict(self.environ, **{name: value}))),
                                base, name)
        self.assertNotEqual(self.key(self.maker(environ=dict(self.environ, LANG="fr_FR"))), base)

    def test_unrelated_environment_does_not(self) -> None:
        base = self.key()
        for name in ("HOME", "TMPDIR", "USER", "PWD", "SSH_AUTH_SOCK"):
            self.assertEqual(self.key(self.maker(environ=dict(self.environ, **{name: "/z"}))),
                             base, name)

    def test_translator_tapsets_runtime_and_rc_change_the_key(self) -> None:
        maker = self.maker()
        base = self.key(maker)
        for path in (self.stap, self.share / "tapset" / "x.stp", self.runtime / "r.h", self.rc):
            original = path.read_bytes() if path.exists() else None
            path.write_bytes((original or b"") + b"# changed\n")
            self.assertNotEqual(self.key(maker), base, str(path))
            if original is None:
                path.unlink()
            else:
                path.write_bytes(original)
            self.assertEqual(self.key(maker), base, f"{path} restored")

    def test_default_runtime_is_the_installed_one(self) -> None:
        maker = self.maker()
        base = maker.key(self.summary, "r1", ("stap",), None)
        (self.share / "runtime" / "r.h").write_text("changed\n")
        self.assertNotEqual(maker.key(self.summary, "r1", ("stap",), None), base)

    def test_build_tree_files_change_the_key(self) -> None:
        maker = self.maker()
        base = self.key(maker)
        (self.build / "include" / "generated" / "utsrelease.h").write_text('"r1+"\n')
        changed = self.key(maker)
        self.assertNotEqual(changed, base)
        (self.build / ".config").write_text("CONFIG_A=m\n")
        self.assertNotEqual(self.key(maker), changed)
        (self.build / "Module.symvers").write_text("0x0 sym vmlinux EXPORT_SYMBOL\n")
        self.assertNotEqual(self.key(maker), changed)

    def test_other_release_build_tree_does_not(self) -> None:
        maker = self.maker()
        base = self.key(maker)
        other = self.modules / "r2" / "build"
        other.mkdir(parents=True)
        (other / ".config").write_text("CONFIG_B=y\n")
        self.assertEqual(self.key(maker), base)

    def test_signers_change_the_key(self) -> None:
        base = self.key()
        one = self.key(signers=(b"cert one",))
        self.assertNotEqual(one, base)
        self.assertNotEqual(self.key(signers=(b"cert two",)), one)
        self.assertNotEqual(self.key(signers=(b"cert one", b"cert two")), one)


class HandlerKeyTests(CachedHandlerCase):
    """End to end: a change to any one part is a miss (the translator runs
    again), the same request again is a hit."""

    async def assertMissThenHit(self, first: bytes, second: bytes) -> None:
        handler = self.cached_handler()
        await self.raw(handler, first)
        self.assertEqual(self.runs(), 1)
        answer = await self.raw(handler, second)
        self.assertEqual(self.runs(), 2, "a changed request is compiled")
        self.assertEqual(await self.raw(handler, second), answer)
        self.assertEqual(self.runs(), 2, "and then answered from the cache")
        self.assertEqual(handler.counters.cache_hits, 1)

    async def test_script_byte(self) -> None:
        await self.assertMissThenHit(request("-p4", "-eprobe begin { exit() }"),
                                     request("-p4", "-eprobe begin { exit( }"))

    async def test_script_file_byte(self) -> None:
        body = captured_requests()[SCRIPT_REQUEST]
        data = members(body)[SCRIPT]
        await self.assertMissThenHit(body, replaced(body, SCRIPT, flip_last_byte(data)))

    async def test_tapset_file_in_the_request(self) -> None:
        body = captured_requests()[SCRIPT_REQUEST]
        data = members(body)[TAPSET]
        await self.assertMissThenHit(body, replaced(body, TAPSET, flip_last_byte(data)))

    async def test_client_option(self) -> None:
        await self.assertMissThenHit(request("-p4", "-eok"), request("-p4", "-v", "-eok"))

    async def test_locale(self) -> None:
        await self.assertMissThenHit(request("-p4", locale=b"LANG=C.UTF-8\n"),
                                     request("-p4", locale=b"LANG=fr_FR.UTF-8\n"))

    async def test_client_version(self) -> None:
        await self.assertMissThenHit(request("-p4", version=b"4.8"),
                                     request("-p4", version=b"4.7"))

    async def test_server_option(self) -> None:
        body = request("-p4")
        await self.raw(self.cached_handler(), body)
        self.options = (ServerOption("-D", "MAXACTION=10000"),)
        await self.raw(self.cached_handler(), body)
        self.assertEqual(self.runs(), 2)
        self.assertIn("-DMAXACTION=10000", self.recorded()["argv"])

    async def test_runtime_file(self) -> None:
        handler = self.cached_handler()
        body = request("-p4")
        first = await self.raw(handler, body)
        self.assertIn(f"-R{self.runtime}", self.recorded()["argv"])
        path = self.runtime / "linux" / "print.c"
        original = path.read_bytes()
        path.write_bytes(flip_last_byte(original))
        second = await self.raw(handler, body)
        self.assertEqual(self.runs(), 2, "a changed runtime file is a miss")
        self.assertEqual(await self.raw(handler, body), second)
        self.assertEqual(self.runs(), 2)
        path.write_bytes(original)
        self.assertEqual(await self.raw(handler, body), first, "back to the first answer")
        self.assertEqual(self.runs(), 2)

    async def test_runtime_file_fixed_with_its_old_mtime(self) -> None:
        """A runtime fix copied in with ``cp -p`` (same size, same mtime) is
        compiled, not answered with the module built from the old file."""
        handler = self.cached_handler()
        body = request("-p4")
        await self.raw(handler, body)
        path = self.runtime / "linux" / "print.c"
        info = path.stat()
        path.write_bytes(flip_last_byte(path.read_bytes()))
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
        await self.raw(handler, body)
        self.assertEqual(self.runs(), 2, "the changed runtime file was noticed")

    async def test_new_runtime_file(self) -> None:
        handler = self.cached_handler()
        body = request("-p4")
        await self.raw(handler, body)
        (self.runtime / "linux" / "extra.h").write_text("/* new */\n")
        await self.raw(handler, body)
        self.assertEqual(self.runs(), 2)

    async def test_kernel_build_tree(self) -> None:
        handler = self.cached_handler()
        body = request("-p4")
        await self.raw(handler, body)
        (self.build / "include" / "generated" / "utsrelease.h").write_text(
            f'#define UTS_RELEASE "{RELEASE}+"\n')
        second = await self.raw(handler, body)
        self.assertEqual(self.runs(), 2, "a rebuilt kernel tree is a miss")
        config = self.build / ".config"
        config.write_bytes(flip_last_byte(config.read_bytes()))
        await self.raw(handler, body)
        self.assertEqual(self.runs(), 3, "a changed .config is a miss")
        self.assertNotEqual(await self.raw(handler, body), second)
        self.assertEqual(self.runs(), 3)

    async def test_signing_key_for_unprivileged_requests(self) -> None:
        handler = self.cached_handler()
        body = request("--privilege=stapusr", "-p4")
        first = members(await self.raw(handler, body))
        self.assertEqual(members(await self.raw(handler, body)), first)
        self.assertEqual(self.runs(), 1)
        original = self.server_identity
        self.server_identity = other_identity()
        second = members(await self.raw(handler, body))
        self.assertEqual(self.runs(), 2, "another server key is a miss")
        module = second["stap000000/stap_fake_1.ko"]
        self.server_identity.certificate.public_key().verify(
            second["stap000000/stap_fake_1.ko.sgn"], module, PKCS1v15(), SHA256())
        self.assertEqual(members(await self.raw(handler, body)), second)
        self.assertEqual(self.runs(), 2)
        self.server_identity = original
        self.assertEqual(members(await self.raw(handler, body)), first)
        self.assertEqual(self.runs(), 2)
        original.certificate.public_key().verify(
            first["stap000000/stap_fake_1.ko.sgn"], first["stap000000/stap_fake_1.ko"],
            PKCS1v15(), SHA256())

    async def test_signing_key_does_not_matter_for_stapdev(self) -> None:
        handler = self.cached_handler()
        body = request("-p4")
        first = await self.raw(handler, body)
        self.server_identity = other_identity()
        self.assertEqual(await self.raw(handler, body), first)
        self.assertEqual(self.runs(), 1)

    async def test_stapusr_and_stapdev_answers_are_kept_apart(self) -> None:
        await self.assertMissThenHit(request("-p4"), request("--privilege=stapusr", "-p4"))

    async def test_translator_program(self) -> None:
        body = request("-p4")
        await self.raw(self.cached_handler(), body)
        with open(self.stap, "a") as out:
            out.write("# a new translator build\n")
        await self.raw(self.cached_handler(), body)
        self.assertEqual(self.runs(), 2)

    async def test_server_rc_file(self) -> None:
        handler = self.cached_handler()
        body = request("-p4")
        await self.raw(handler, body)
        self.rc.write_text("--suppress-handler-errors\n")
        await self.raw(handler, body)
        self.assertEqual(self.runs(), 2)

    async def test_other_release_same_request(self) -> None:
        handler = self.cached_handler()
        await self.raw(handler, request("-p4"))
        await self.raw(handler, request("-p4", release="6.18.44-fc-v657"))
        self.assertEqual(self.runs(), 2)


class HandlerUncacheableTests(CachedHandlerCase):
    """What the handler does with a key that cannot be made."""

    async def test_uncacheable_form_is_compiled_every_time_and_logged(self) -> None:
        handler = self.cached_handler()
        events = Events()
        handler.log = Logger(observer=events)
        body = request("-p4", '-eprobe process("ls").begin { exit() }')
        await self.raw(handler, body)
        await self.raw(handler, body)
        self.assertEqual(self.runs(), 2)
        self.assertEqual(handler.counters.cache_hits, 0)
        logged = events.matching("Not caching the answer to peer: process() names a file "
                                 "by a relative name")
        self.assertEqual(len(logged), 2, events.lines())

    async def test_keys_are_made_in_their_own_pool(self) -> None:
        handler = self.cached_handler()
        key_pool = ThreadPool(minthreads=0, maxthreads=1, name="test-keys")
        key_pool.start()
        self.addCleanup(key_pool.stop)
        handler.key_pool = key_pool
        threads: list[str] = []
        real = KeyMaker.key

        def recording(maker: KeyMaker, *args: Any, **kwargs: Any) -> str:
            threads.append(threading.current_thread().name)
            return real(maker, *args, **kwargs)

        self.patch(KeyMaker, "key", recording)
        body = request("-p4", "-eprobe begin { exit() }")
        await self.raw(handler, body)
        await self.raw(handler, body)
        self.assertEqual(len(threads), 2)
        self.assertTrue(all("test-keys" in name for name in threads), threads)
        self.assertEqual(handler.counters.cache_hits, 1)
