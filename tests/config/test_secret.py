"""Fleet secret and Redis password files (stapsrv.config.secret), and the
command that makes a secret (python3 -m stapsrv.cli.fleet)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from stapsrv.config.secret import (
    PASSWORD_VARIABLE,
    SECRET_BYTES,
    SecretError,
    create_secret,
    load_password,
    load_secret,
)
from tests.helpers import ROOT
from tests.helpers.realserver import test_user


class SecretFileTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.path = self.base / "fleet.secret"

    def refusal(self, function: object, *args: object) -> str:
        with self.assertRaises(SecretError) as caught:
            function(*args)  # type: ignore[operator]
        return str(caught.exception)

    def test_new_secret(self) -> None:
        create_secret(self.path)
        info = self.path.stat()
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_size), (0o600, SECRET_BYTES))
        self.assertEqual(load_secret(self.path), self.path.read_bytes())
        self.assertEqual(sorted(os.listdir(self.base)), ["fleet.secret"], "no temporary left")
        other = self.base / "other"
        create_secret(other)
        self.assertNotEqual(load_secret(other), load_secret(self.path))

    def test_existing_file_is_kept_unless_forced(self) -> None:
        create_secret(self.path)
        first = self.path.read_bytes()
        message = self.refusal(create_secret, self.path)
        self.assertIn("exists; give --force", message)
        self.assertEqual(self.path.read_bytes(), first)
        create_secret(self.path, force=True)
        self.assertNotEqual(self.path.read_bytes(), first)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.base)), ["fleet.secret"])

    def test_unusable_files_are_refused(self) -> None:
        self.assertIn("No such file", self.refusal(load_secret, self.path))
        self.path.write_bytes(b"short")
        self.path.chmod(0o600)
        self.assertIn("fewer than 32", self.refusal(load_secret, self.path))
        self.path.write_bytes(os.urandom(32))
        for mode in (0o640, 0o604, 0o620):
            self.path.chmod(mode)
            self.assertIn(f"mode {mode:04o}", self.refusal(load_secret, self.path))
        self.path.chmod(0o600)
        link = self.base / "link"
        link.symlink_to(self.path)
        self.assertIn("cannot read", self.refusal(load_secret, link))
        self.assertIn("not a regular file", self.refusal(load_secret, self.base))
        self.path.write_bytes(b"x" * 5000)
        self.assertIn("larger than", self.refusal(load_secret, self.path))

    def test_password_from_a_file_or_the_environment(self) -> None:
        self.assertIsNone(load_password(None, {}))
        self.assertEqual(load_password(None, {PASSWORD_VARIABLE: "from-env"}), "from-env")
        password = self.base / "password"
        password.write_text("from-file\nsecond line\n")
        password.chmod(0o600)
        self.assertEqual(load_password(password, {PASSWORD_VARIABLE: "from-env"}), "from-file")
        password.chmod(0o644)
        self.assertIn("chmod 600", self.refusal(load_password, password))


class SecretCommandTests(TestCase):
    """The command an admin runs."""

    def run_command(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stapsrv.cli.fleet", *arguments],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    def test_secret_command(self) -> None:
        path = Path(self.mktemp()).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        done = self.run_command("secret", str(path))
        self.assertEqual((done.returncode, done.stdout, done.stderr),
                         (0, f"Wrote a new fleet secret to {path}\n", ""))
        self.assertEqual(len(load_secret(path)), SECRET_BYTES)
        first = path.read_bytes()
        again = self.run_command("secret", str(path))
        self.assertEqual(again.returncode, 1)
        self.assertEqual(again.stderr, f"fleet secret: {path} exists; give --force to "
                                       "replace it (every server of the fleet then needs "
                                       "the new one)\n")
        self.assertEqual(path.read_bytes(), first)
        self.assertEqual(self.run_command("secret", "--force", str(path)).returncode, 0)
        self.assertNotEqual(path.read_bytes(), first)

    def test_owner(self) -> None:
        path = Path(self.mktemp()).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        bad = self.run_command("secret", "--user", "no-such-user-here", str(path))
        self.assertEqual((bad.returncode, bad.stderr),
                         (1, "fleet secret: no such user 'no-such-user-here'\n"))
        self.assertFalse(path.exists())
        user = test_user()
        done = self.run_command("secret", "--user", user.pw_name, str(path))
        self.assertEqual(done.returncode, 0, done.stderr)
        info = path.stat()
        self.assertEqual((info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)),
                         (user.pw_uid, user.pw_gid, 0o600))
