"""A real compile that cannot finish until the test says so.

A :class:`CompileGate` is a FIFO in a directory of its own.  A guru-mode
script includes it from embedded C (``%{ #include "<fifo>" %}``), so the
real translator runs passes 1-3 as usual and then the compiler of pass 4
opens the FIFO and waits there: on the open until some process opens the
other end, then on the read until that end is closed (an empty header,
after which the compile goes on).  Nothing but the test ever writes to it,
so a compile that reached the gate stays there for as long as the test
wants, on any machine, however fast.

The server must see the directory: it is given as the server's ``-I``
(a tapset directory with no ``.stp`` in it, which the sandbox shows read
only and the translator's pass 1 reads nothing from), and the FIFO is
readable by everyone.  A script with ``#include`` in embedded C is never
answered from a response cache (``core/scriptpaths``), so every request
with the gate script runs the translator.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from tests.helpers.waiting import poll


class CompileGate:
    """A FIFO that holds pass 4 of the scripts that include it."""

    def __init__(self, base: Path) -> None:
        self.directory = base / "gate"
        self.directory.mkdir(mode=0o755)
        self.directory.chmod(0o755)
        self.fifo = self.directory / "gate.h"
        os.mkfifo(self.fifo)
        self.fifo.chmod(0o644)
        self._writer: int | None = None

    def server_arguments(self) -> tuple[str, str]:
        """The server options that show the gate to its translators."""
        return ("-I", str(self.directory))

    def script(self, tag: str) -> str:
        """A new guru-mode script (send it with ``-g``) held at the gate."""
        return (f'%{{\n#include "{self.fifo}"\n%}}\n'
                f'probe begin {{ println("{tag} {uuid.uuid4().hex}"); exit() }}')

    def _reader_waiting(self) -> bool:
        """Whether a compiler is at the gate: some process has the FIFO open.
        The gate opens the writing end as soon as a reader is there (before
        that, a reader waits in its open), and keeps it open, so that
        every compiler waits in its read until :meth:`release`."""
        if self._writer is None:
            try:
                self._writer = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no reader yet
                    return False
                raise
        return bool(self.holders())

    async def reached(self, timeout: float = 300.0) -> None:
        """Wait until a compile is at the gate (``timeout`` is only a net
        for a test that went wrong, never a measure of speed)."""
        if not await poll(self._reader_waiting, timeout, 0.05):
            raise AssertionError(f"no compiler opened {self.fifo} within {timeout} s")

    def holders(self) -> list[int]:
        """The processes that have the gate open (but this one, which holds
        its writing end)."""
        fifo = str(self.fifo)
        held = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                names = os.listdir(f"/proc/{entry}/fd")
            except OSError:
                continue
            for name in names:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{name}") == fifo:
                        held.append(int(entry))
                        break
                except OSError:
                    pass
        return held

    def release(self) -> None:
        """Let the compiles at the gate go on: they read an empty header,
        and whatever opens the gate's path from now on (the build's
        ``fixdep`` reads every header a compile used) finds an empty file."""
        empty = self.directory / "gate.empty"
        empty.write_bytes(b"")
        empty.chmod(0o644)
        if self._writer is None:
            try:
                self._writer = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
        os.replace(empty, self.fifo)
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
