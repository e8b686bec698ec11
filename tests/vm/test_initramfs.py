"""The initramfs made from a client's files: a fake distribution root with
hand-made ELF files, and the machine's own staprun."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.vm import initramfs
from stapsrv.vm.initramfs import GROUPS, MARK, USER, Job, MissingFile, Staprun, build
from tests.helpers import require
from tests.vm.test_elf import make_elf


def put(root: Path, path: str, data: bytes, mode: int = 0o755) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    target.chmod(mode)


def fake_root(base: Path) -> Path:
    """A merged-/usr root: staprun needs libfoo through a symbolic link and
    the loader through /lib64; stapio finds libbar by its RUNPATH."""
    root = base / "root"
    (root / "usr" / "lib64").mkdir(parents=True)
    os.symlink("usr/lib64", root / "lib64")
    put(root, "/usr/bin/staprun", make_elf("/lib64/ld-linux-x86-64.so.2", ["libfoo.so.1"]))
    put(root, "/usr/lib64/ld-linux-x86-64.so.2", make_elf(None, []))
    put(root, "/usr/lib/x86_64-linux-gnu/libfoo.so.1.2", make_elf(None, []))
    os.symlink("libfoo.so.1.2", root / "usr/lib/x86_64-linux-gnu/libfoo.so.1")
    put(root, "/usr/libexec/systemtap/stapio",
        make_elf("/lib64/ld-linux-x86-64.so.2", ["libbar.so"], "$ORIGIN/../private"))
    put(root, "/usr/libexec/private/libbar.so", make_elf(None, ["libfoo.so.1"]))
    put(root, "/usr/lib/x86_64-linux-gnu/nss/libsoftokn3.so", make_elf(None, []))
    put(root, "/usr/lib/x86_64-linux-gnu/nss/libsoftokn3.chk", b"check", 0o644)
    return root


class FakeRootTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.root = fake_root(self.base)
        self.busybox = self.base / "busybox"
        self.busybox.write_bytes(b"busybox")
        self.module = self.base / "stap_abc_1.ko"
        self.module.write_bytes(b"module")

    def test_every_file_with_the_links_that_lead_to_it(self) -> None:
        staprun = Staprun.named(str(self.root))
        self.assertEqual(staprun.stapio, "/usr/libexec/systemtap/stapio")
        tree = build(staprun, Job(self.module, group="stapsys"), str(self.busybox))
        entries = tree.entries
        for path in ("/usr/bin/staprun", "/usr/lib64/ld-linux-x86-64.so.2",
                     "/usr/lib/x86_64-linux-gnu/libfoo.so.1.2", "/usr/libexec/private/libbar.so",
                     "/usr/lib/x86_64-linux-gnu/nss/libsoftokn3.so",
                     "/usr/lib/x86_64-linux-gnu/nss/libsoftokn3.chk",
                     "/stapsrv/busybox", "/stapsrv/work/stap_abc_1.ko", "/init",
                     "/etc/passwd", "/etc/group"):
            self.assertTrue(stat.S_ISREG(entries[path].mode), path)
        self.assertEqual(entries["/lib64"].data, b"usr/lib64")
        self.assertEqual(entries["/usr/lib/x86_64-linux-gnu/libfoo.so.1"].data, b"libfoo.so.1.2")
        self.assertTrue(stat.S_ISCHR(entries["/dev/console"].mode))
        names = list(entries)
        for name in names:
            if name != "/":
                self.assertLess(names.index(os.path.dirname(name)), names.index(name), name)
        program = entries["/usr/bin/staprun"]
        self.assertEqual((stat.S_IMODE(program.mode), program.uid, program.gid),
                         (0o4754, 0, GROUPS["stapusr"]))
        groups = entries["/etc/group"].data.decode()
        self.assertIn(f"stapusr:x:{GROUPS['stapusr']}:{USER}\n", groups)
        self.assertIn(f"stapsys:x:{GROUPS['stapsys']}:{USER}\n", groups)
        self.assertIn(f"stapdev:x:{GROUPS['stapdev']}:\n", groups)
        self.assertRaises(MissingFile, build, staprun, Job(self.module, group="root"),
                          str(self.busybox))

    def test_files_come_from_the_staprun_root(self) -> None:
        """A program a probe watches is the client's: taken from the root
        its staprun is in, with that root's libraries (not the machine's)."""
        put(self.root, "/usr/bin/ls", make_elf("/lib64/ld-linux-x86-64.so.2", ["libfoo.so.1"]))
        entries = build(Staprun.in_root(self.root), Job(self.module, files=("/usr/bin/ls",)),
                        str(self.busybox)).entries
        self.assertEqual(entries["/usr/bin/ls"].data, (self.root / "usr/bin/ls").read_bytes())
        self.assertIn("/usr/lib/x86_64-linux-gnu/libfoo.so.1.2", entries)
        # One the root has not is the machine's.
        require(Path("/bin/busybox").is_file(), "busybox-static is not installed")
        entries = build(Staprun.in_root(self.root), Job(self.module, files=("/bin/busybox",)),
                        str(self.busybox)).entries
        real = entries["/bin/busybox"] if "/bin/busybox" in entries else entries[
            "/usr/bin/busybox"]
        self.assertEqual(real.data, Path("/bin/busybox").read_bytes())

    def test_init_runs_staprun_with_the_job(self) -> None:
        job = Job(self.module, ("-vv",), "/usr/bin/busybox true", seconds=30)
        script = initramfs.init_script(Staprun.in_root(self.root), job)
        self.assertIn("timeout 30 /usr/bin/staprun -vv -c '/usr/bin/busybox true' "
                      "/stapsrv/work/stap_abc_1.ko >/tmp/stapsrv.out", script)
        self.assertIn(f'echo "{MARK} init@@"', script)
        self.assertIn("poweroff -f", script)
        # The console has sent the exit marker before the power goes off.
        exit_marker = script.index(f"{MARK} exit %d@@")
        drained = script.index("stty -F /dev/console")
        self.assertLess(exit_marker, drained)
        self.assertLess(drained, script.index("poweroff -f"))
        unprivileged = initramfs.init_script(Staprun.in_root(self.root),
                                             Job(self.module, group="stapusr"))
        self.assertIn(f"su -s /stapsrv/bin/sh {USER} -c", unprivileged)

    def test_signature_and_signers(self) -> None:
        (self.base / "stap_abc_1.ko.sgn").write_bytes(b"sig")
        signers = self.base / "signers"
        signers.mkdir()
        (signers / "cert9.db").write_bytes(b"db")
        staprun = Staprun.prefix("/opt/stap55")
        self.assertEqual(staprun.sysconfdir, "/opt/stap55/etc")
        tree = initramfs.Tree()
        initramfs.put_signers(tree, staprun, signers)
        database = "/opt/stap55/etc/systemtap/staprun"
        self.assertEqual(tree.entries[f"{database}/cert9.db"].data, b"db")
        for legacy in ("cert8.db", "key3.db", "secmod.db"):
            self.assertEqual(tree.entries[f"{database}/{legacy}"].data, b"")
        self.assertEqual(tree.entries["/stapsrv/work/sql:"].data, b"/")
        entries = build(Staprun.in_root(self.root), Job(self.module, signers=signers),
                        str(self.busybox)).entries
        self.assertEqual(entries["/stapsrv/work/stap_abc_1.ko.sgn"].data, b"sig")
        self.assertIn("/etc/systemtap/staprun/cert9.db", entries)

    def test_a_readable_copy_goes_where_the_client_has_staprun(self) -> None:
        copy = self.base / "copy-of-staprun"
        copy.write_bytes(make_elf("/lib64/ld-linux-x86-64.so.2", ["libfoo.so.1"]) + b"copy")
        os.chmod(self.root / "usr/bin/staprun", 0o100)  # unreadable, as 5.5's is
        staprun = Staprun(self.root, "/usr/bin/staprun", "/usr/libexec/systemtap/stapio",
                          "/etc", program=copy)
        entries = build(staprun, Job(self.module), str(self.busybox)).entries
        program = entries["/usr/bin/staprun"]
        self.assertTrue(program.data.endswith(b"copy"))
        self.assertEqual((stat.S_IMODE(program.mode), program.gid), (0o4754, GROUPS["stapusr"]))
        self.assertIn("/usr/lib/x86_64-linux-gnu/libfoo.so.1.2", entries)
        # One the root has not is the machine's.
        require(Path("/bin/busybox").is_file(), "busybox-static is not installed")
        entries = build(Staprun.in_root(self.root), Job(self.module, files=("/bin/busybox",)),
                        str(self.busybox)).entries
        real = entries["/bin/busybox"] if "/bin/busybox" in entries else entries[
            "/usr/bin/busybox"]
        self.assertEqual(real.data, Path("/bin/busybox").read_bytes())

    def test_a_missing_library_is_named(self) -> None:
        os.unlink(self.root / "usr/lib/x86_64-linux-gnu/libfoo.so.1")
        with self.assertRaises(MissingFile) as raised:
            build(Staprun.in_root(self.root), Job(self.module), str(self.busybox))
        self.assertIn("needs libfoo.so.1", str(raised.exception))

    def test_what_holds_no_staprun(self) -> None:
        self.assertRaises(MissingFile, Staprun.named, str(self.base))
        self.assertEqual(Staprun.named("host"), Staprun.host())


class MachineTests(TestCase):
    def test_the_machines_staprun_and_nss(self) -> None:
        require(Path("/usr/bin/staprun").exists() and Path("/bin/busybox").exists(),
                "systemtap or busybox-static is not installed (run 'make setup')")
        module = Path(self.mktemp())
        module.write_bytes(b"module")
        entries = build(Staprun.host(), Job(module)).entries
        real = [name for name, entry in entries.items() if stat.S_ISREG(entry.mode)]
        for wanted in ("staprun", "stapio", "libnss3.so", "libsoftokn3.so", "libfreebl3.so",
                       "libc.so.6", "ld-linux-x86-64.so.2"):
            self.assertTrue(any(name.endswith("/" + wanted) for name in real), wanted)
        self.assertEqual(entries["/lib"].data, b"usr/lib")


class ReadRegularTests(TestCase):
    """A root may be someone else's: what is read from it is a regular file,
    reached without a link in its last part, of a bounded size."""

    def test_fifo_link_and_size(self) -> None:
        import os
        from stapsrv.vm.initramfs import read_regular
        base = Path(self.mktemp())
        base.mkdir()
        os.mkfifo(base / "fifo")
        (base / "file").write_bytes(b"x" * 10)
        os.symlink(base / "file", base / "link")
        self.assertEqual(read_regular(base / "file"), b"x" * 10)
        for name in ("fifo", "link"):
            with self.assertRaises(MissingFile):
                read_regular(base / name)
        with self.assertRaises(MissingFile):
            read_regular(base / "file", limit=9)
