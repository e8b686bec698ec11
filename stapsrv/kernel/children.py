"""A helper program run to completion, but never for longer than its
deadline: ``apt-get``, ``apt-cache``, ``dpkg-deb`` and the pipelines and
children of the kernel store.

The program starts through ``setsid``, which execs it in a process group
of its own (same process), so that at the deadline a signal reaches every
member of a pipeline (``dpkg-deb | tar``), not only the shell: SIGTERM,
then SIGKILL :data:`~stapsrv.core.programs.KILL_GRACE` seconds later.
Its standard input is an empty pipe; what it writes is collected in memory,
each stream up to a cap (the rest is counted, not kept).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from stapsrv.core.programs import KILL_GRACE, NICE, SETSID, STORE_NICENESS
from stapsrv.reactor import IHandlerReactor

#: Bytes of each output stream kept (helpers say what matters in a line or
#: two; a listing that goes past this is cut, not kept whole).
OUTPUT_CAP = 16 << 20


class ChildTimedOut(Exception):
    """The program ran past its deadline and was stopped."""

    def __init__(self, program: str, seconds: float) -> None:
        super().__init__(f"{os.path.basename(program)} did not finish within {seconds:g} s "
                         "and was stopped")
        self.program = program
        self.seconds = seconds


class _Collected(ProcessProtocol):
    def __init__(self, cap: int) -> None:
        self.streams = {1: bytearray(), 2: bytearray()}
        self.cap = cap
        self.ended: Deferred[int] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        stream = self.streams.get(childFD)
        if stream is not None:
            stream += data[:max(0, self.cap - len(stream))]

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            self.ended.callback(0)
            return
        error = reason.value
        assert isinstance(error, ProcessTerminated)
        code = error.exitCode if error.exitCode is not None else 128 + (error.signal or 0)
        self.ended.callback(code)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


async def run_child(reactor: IHandlerReactor, argv: Sequence[str], env: Mapping[str, str],
                    timeout: float, cwd: Path | None = None,
                    cap: int = OUTPUT_CAP) -> tuple[bytes, bytes, int]:
    """Run ``argv`` (its first word a path) to completion: (output, errors,
    exit code, 128 + N for a signal).  Raise :class:`ChildTimedOut` once
    its process group had to be ended after ``timeout`` seconds."""
    protocol = _Collected(cap)
    process = reactor.spawnProcess(
        protocol, SETSID, [SETSID, "--wait", "--", NICE, "-n", str(STORE_NICENESS), *argv],
        env=dict(env),
        path=str(cwd) if cwd is not None else None, childFDs={0: "w", 1: "r", 2: "r"})
    pgid = process.pid  # None when it already ended (and was reaped)
    process.closeStdin()
    expired = False
    hard: IDelayedCall | None = None

    def expire() -> None:
        nonlocal expired, hard
        if pgid is None:
            return
        expired = True
        _signal_group(pgid, signal.SIGTERM)
        hard = reactor.callLater(KILL_GRACE, _signal_group, pgid, signal.SIGKILL)

    deadline = reactor.callLater(timeout, expire)
    try:
        code = await protocol.ended
    except BaseException:  # cancelled: nothing may run on without its deadline
        if pgid is not None:
            _signal_group(pgid, signal.SIGKILL)
        raise
    finally:
        if deadline.active():
            deadline.cancel()
        if hard is not None and hard.active():
            hard.cancel()
    if expired and pgid is not None:
        _signal_group(pgid, signal.SIGKILL)  # what of the group outlived its leader
        raise ChildTimedOut(argv[0], timeout)
    return bytes(protocol.streams[1]), bytes(protocol.streams[2]), code
