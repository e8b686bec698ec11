"""The translator's sandbox, with the real bwrap as the server user."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.compile.sandbox import (
    WARM_UP_SCRIPT,
    Sandbox,
    SandboxUnavailable,
    StapconfStore,
    translator_environment,
)
from tests.helpers import require_header_release, require_program
from tests.helpers.realserver import (
    as_server_user,
    fixed_runtime_for,
    owned_directory,
    remove_tree,
    scratch_directory,
    test_user,
)

CANARY = "stapsrv-sandbox-canary-0f1e2d3c"


class EnvironmentTests(TestCase):
    def test_only_what_the_translator_needs(self) -> None:
        kept = translator_environment({
            "PATH": "/usr/bin", "HOME": "/h", "LANG": "C", "LC_ALL": "C.UTF-8",
            "SYSTEMTAP_DIR": "/h/.systemtap", "SYSTEMTAP_TAPSET": "/t",
            "STAPSRV_FLEET_PASSWORD": "secret", "REDISCLI_AUTH": "secret",
            "SSH_AUTH_SOCK": "/run/x", "LD_PRELOAD": "/evil.so", "PYTHONPATH": "/x"})
        self.assertEqual(kept, {"PATH": "/usr/bin", "HOME": "/h", "LANG": "C",
                                "LC_ALL": "C.UTF-8", "SYSTEMTAP_DIR": "/h/.systemtap",
                                "SYSTEMTAP_TAPSET": "/t"})


class WordsTests(TestCase):
    def test_a_toolchains_usr_with_the_hosts_kernel_files_in_it(self) -> None:
        """Another system's /usr, rebuilt only along the paths that lead to
        the host's files of an installed release (bwrap cannot make mount
        points in a read-only tree it does not own)."""
        root = Path(self.mktemp()).absolute()
        for directory in ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/src", "usr/share",
                          "etc"):
            (root / directory).mkdir(parents=True)
        (root / "usr" / "lib" / "os-release").write_text("forky\n")
        (root / "usr" / "lib" / "cpp").symlink_to("/etc/alternatives/cpp")
        (root / "lib").symlink_to("usr/lib")
        tree = Path("/usr/src/linux-headers-X-amd64")
        kbuild = Path("/usr/lib/linux-kbuild-6.1")
        modules = Path("/usr/lib/modules/X-amd64")
        words = Sandbox(home=root, systemtap_dir=root / ".s").words(
            root / "scratch", system=root, host_paths=(tree, kbuild, modules))
        triples = list(zip(words, words[1:], words[2:]))
        self.assertNotIn(("--ro-bind", str(root / "usr"), "/usr"), triples)
        self.assertIn(("--ro-bind", str(root / "usr" / "bin"), "/usr/bin"), triples)
        self.assertIn(("--ro-bind", str(root / "usr" / "share"), "/usr/share"), triples)
        self.assertIn(("--ro-bind", str(root / "usr" / "lib" / "x86_64-linux-gnu"),
                       "/usr/lib/x86_64-linux-gnu"), triples)
        self.assertIn(("--symlink", "/etc/alternatives/cpp", "/usr/lib/cpp"), triples)
        for path in (tree, kbuild, modules):
            self.assertIn(("--ro-bind", str(path), str(path)), triples)
        self.assertIn(("--symlink", "usr/lib", "/lib"), triples)
        # The system's loader cache, the host's users.
        self.assertIn(("--ro-bind-try", str(root / "etc" / "ld.so.cache"), "/etc/ld.so.cache"),
                      triples)
        self.assertIn(("--ro-bind-try", "/etc/passwd", "/etc/passwd"), triples)
        # Each directory is made before what is mounted in it.
        self.assertLess(words.index("/usr/lib"), words.index(str(kbuild)))

    def test_a_root_of_the_clients_distribution_at_the_sysroot(self) -> None:
        """The root's /usr and loader files at /sysroot, and there too the
        /boot files (a translator with --sysroot looks for System.map in
        it) and the files shown over one the root has; not those it has not."""
        root = Path(self.mktemp()).absolute()
        (root / "usr" / "lib" / "modules" / "X" / "kernel").mkdir(parents=True)
        (root / "usr" / "lib" / "modules" / "X" / "kernel" / "a.ko").write_text("")
        (root / "lib").symlink_to("usr/lib")
        files = [(Path("/store/System.map-X"), "/boot/System.map-X"),
                 (Path("/store/a.ko"), "/usr/lib/modules/X/kernel/a.ko"),
                 (Path("/store/b.ko"), "/usr/lib/modules/X/kernel/b.ko")]
        words = Sandbox(home=Path("/h"), systemtap_dir=Path("/h/.s")).words(
            Path("/t/x"), files, sysroot=root)
        triples = list(zip(words, words[1:], words[2:]))
        self.assertIn(("--ro-bind", str(root / "usr"), "/sysroot/usr"), triples)
        self.assertIn(("--symlink", "usr/lib", "/sysroot/lib"), triples)
        self.assertIn(("--ro-bind-try", str(root / "etc" / "ld.so.cache"),
                       "/sysroot/etc/ld.so.cache"), triples)
        self.assertIn(("--ro-bind", "/store/System.map-X", "/sysroot/boot/System.map-X"),
                      triples)
        self.assertIn(("--ro-bind", "/store/a.ko", "/sysroot/usr/lib/modules/X/kernel/a.ko"),
                      triples)
        self.assertNotIn("/sysroot/usr/lib/modules/X/kernel/b.ko", words)
        # Its own files keep their places; the sysroot's /usr comes before
        # what is shown in it.
        self.assertIn(("--ro-bind", "/store/System.map-X", "/boot/System.map-X"), triples)
        self.assertLess(words.index("/sysroot/usr"),
                        words.index("/sysroot/usr/lib/modules/X/kernel/a.ko"))
        self.assertNotIn("/sysroot/usr", Sandbox(home=Path("/h"), systemtap_dir=Path(
            "/h/.s")).words(Path("/t/x"), files))

    def test_the_hosts_system_is_unchanged(self) -> None:
        words = Sandbox(home=Path("/h"), systemtap_dir=Path("/h/.s")).words(Path("/t/x"))
        start = words.index("--ro-bind")
        self.assertEqual(words[start:start + 3], ["--ro-bind", "/usr", "/usr"])

    def test_trees_around_the_home_are_never_shown(self) -> None:
        """A translator installed in the server user's home (its bin/'s
        parent is the home) must not bring the home, and the key in it, back."""
        base = Path(self.mktemp()).absolute()
        home = base / "home"
        runtime = home / ".cache" / "stapsrv" / "runtime-1"
        runtime.mkdir(parents=True)
        (base / "taps").mkdir()
        sandbox = Sandbox(home=home, systemtap_dir=home / ".systemtap",
                          read_only=(home, base, Path("/"), runtime, base / "taps"))
        words = sandbox.words(base / "tmp" / "stap-server.x")
        shown = [words[i + 1] for i, word in enumerate(words) if word == "--ro-bind"]
        self.assertIn(str(runtime), shown)
        self.assertIn(str(base / "taps"), shown)
        for path in (home, base, Path("/")):
            self.assertNotIn(str(path), shown)


class StapconfStoreTests(TestCase):
    def test_seed_and_collect_only_headers(self) -> None:
        base = Path(self.mktemp())
        made = base / "warm" / "cache" / "ab"
        made.mkdir(parents=True)
        (made / "stapconf_ab12_810.h").write_text("#define X 1\n")
        (made / "stap_ab12_1.ko").write_bytes(b"\x7fELF")
        (made / "stapconf_evil.h").symlink_to("/etc/passwd")
        store = StapconfStore(base / "store")
        self.assertEqual(store.collect(base / "warm"), 1)
        self.assertEqual(store.collect(base / "warm"), 0)
        private = base / "private"
        store.seed(private)
        self.assertEqual(sorted(str(p.relative_to(private)) for p in private.rglob("*")
                                if p.is_file()), ["cache/ab/stapconf_ab12_810.h"])


class RealSandboxTests(TestCase):
    """Commands run as the server user in a request's sandbox."""

    timeout = 600

    def setUp(self) -> None:
        require_program("bwrap")
        self.base = scratch_directory("sandbox-")
        self.addCleanup(remove_tree, self.base)
        self.home = owned_directory(self.base / "home")
        self.systemtap_dir = owned_directory(self.home / ".systemtap")
        secrets = owned_directory(self.systemtap_dir / "ssl" / "server")
        self.secrets = [self.home / "canary", secrets / "stap-key.pem",
                        owned_directory(secrets / "moks" / "aa:bb") / "signing_key.priv"]
        tmp = owned_directory(self.base / "tmp")
        other = owned_directory(tmp / "stap-server.other")
        self.secrets.append(other / "request.zip")
        for path in self.secrets:
            path.write_text(CANARY + "\n")
            os.chown(path, *self.ids())
        self.scratch = owned_directory(tmp / "stap-server.this")
        owned_directory(self.scratch / "request")
        self.sandbox = Sandbox(home=self.home, systemtap_dir=self.systemtap_dir)
        self.store = StapconfStore(owned_directory(self.base / "stapconf"))
        self.prepare(self.scratch)

    def ids(self) -> tuple[int, int]:
        user = test_user()
        return user.pw_uid, user.pw_gid

    def prepare(self, scratch: Path) -> None:
        """What the server (its own user) does before a run."""
        self.sandbox.prepare(scratch, None, self.store)
        for top in self.sandbox.private_dirs(scratch):
            for path in [top, *top.rglob("*")]:
                os.chown(path, *self.ids())

    def inside(self, *command: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
        environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(self.home),
                       "SYSTEMTAP_DIR": str(self.systemtap_dir), **(env or {})}
        return subprocess.run(as_server_user([*self.sandbox.words(self.scratch), *command]),
                              env=environment, capture_output=True, text=True, timeout=300)

    def test_the_sysroot_shows_the_roots_files(self) -> None:
        """A root (a small one made here) at /sysroot: its programs and the
        /boot file readable there, nothing writable."""
        root = owned_directory(self.base / "root")
        (root / "usr" / "bin").mkdir(parents=True)
        (root / "usr" / "bin" / "marker").write_text("from the root\n")
        (root / "bin").symlink_to("usr/bin")
        symbols = self.base / "System.map-X"
        symbols.write_text("ffffffff81000000 T _text\n")
        words = self.sandbox.words(self.scratch, [(symbols, "/boot/System.map-X")],
                                   sysroot=root)
        done = subprocess.run(as_server_user([
            *words, "/bin/sh", "-c", "cat /sysroot/bin/marker /sysroot/boot/System.map-X; "
            "touch /sysroot/usr/bin/x 2>/dev/null && echo writable; true"]),
            env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
        self.assertEqual((done.returncode, done.stdout),
                         (0, "from the root\nffffffff81000000 T _text\n"), done.stderr)

    def test_check_passes_here(self) -> None:
        self.sandbox.check()

    def test_check_names_a_missing_bwrap(self) -> None:
        sandbox = Sandbox(home=self.home, systemtap_dir=self.systemtap_dir,
                          bwrap="/nonexistent/bwrap")
        with self.assertRaises(SandboxUnavailable) as caught:
            sandbox.check()
        self.assertIn("/nonexistent/bwrap is not installed", str(caught.exception))

    def test_server_files_are_not_there(self) -> None:
        for path in self.secrets:
            result = self.inside("cat", str(path))
            self.assertNotEqual(result.returncode, 0, path)
            self.assertNotIn(CANARY, result.stdout + result.stderr)
        listing = self.inside("find", str(self.home), str(self.base / "tmp"))
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertNotIn("canary", listing.stdout)
        self.assertNotIn("stap-server.other", listing.stdout)
        self.assertNotIn("stap-key.pem", listing.stdout)

    def test_only_the_scratch_directory_is_writable(self) -> None:
        result = self.inside("sh", "-c", f"echo ok > {self.scratch}/made && echo ok > /tmp/t")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual((self.scratch / "made").read_text(), "ok\n")
        for target in ("/usr/x", "/etc/x", str(self.base / "outside"), "/x",
                       str(self.secrets[1])):
            result = self.inside("sh", "-c", f"echo pwned > {target}")
            self.assertNotEqual(result.returncode, 0, target)
        self.assertFalse((self.base / "outside").exists())
        self.assertEqual(self.secrets[1].read_text(), CANARY + "\n")
        self.assertFalse(Path("/x").exists())

    def test_no_network_not_even_loopback(self) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        self.addCleanup(listener.close)
        port = listener.getsockname()[1]
        result = self.inside("python3", "-c", (
            "import socket\n"
            f"socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"))
        self.assertNotEqual(result.returncode, 0)
        with self.assertRaises(OSError):
            listener.accept()

    def test_own_pid_namespace_and_no_capabilities(self) -> None:
        result = self.inside("sh", "-c", "ls /proc | grep -c '^[0-9]'; "
                             "grep CapEff /proc/self/status; unshare -U true")
        lines = result.stdout.split()
        self.assertLessEqual(int(lines[0]), 5, result.stdout)
        self.assertIn("0000000000000000", result.stdout)
        self.assertNotEqual(result.returncode, 0, "no nested user namespaces")

    def test_real_translator_shares_only_the_server_made_stapconf(self) -> None:
        release = require_header_release()
        require_program("stap")
        runtime = fixed_runtime_for(release)
        runtime_words = [f"-R{runtime}"] if runtime else []
        self.sandbox = Sandbox(home=self.home, systemtap_dir=self.systemtap_dir,
                               read_only=tuple(Path(r) for r in [runtime] if r))
        module_dir = owned_directory(self.scratch / "response")
        result = self.inside("stap", f"-r{release}", *runtime_words, f"--tmpdir={module_dir}",
                             "-p4", "-e", WARM_UP_SCRIPT)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertTrue(result.stdout.strip().startswith(str(self.systemtap_dir / "cache")),
                        "the module is named where the translator believes its cache is")
        _, private = self.sandbox.private_dirs(self.scratch)
        self.assertEqual(self.store.collect(private), 1)
        self.assertFalse(any((self.systemtap_dir / "cache").glob("*/stap_*.ko")),
                         "the server's own cache was not written")
        # The next request starts with the header and nothing else.
        second = owned_directory(Path(tempfile.mkdtemp(dir=self.base / "tmp")))
        owned_directory(second / "request")
        self.prepare(second)
        home, private = self.sandbox.private_dirs(second)
        self.assertEqual([p.name.split("_")[0] for p in private.rglob("*") if p.is_file()],
                         ["stapconf"])
        self.assertEqual(list(home.iterdir()), [])
