"""Running the ``stap`` translator as a child process group.

``spawnProcess`` is called from the reactor thread.  The child's standard
output and error come through pipes and are written, as they arrive, to the
response files, each up to a size limit (``--max-output``): a translator
that goes past it is stopped, so that an output flood costs neither memory
nor disk nor time.  Its input is ``/dev/null``.  It starts through three small
util-linux programs, each of which execs the next in the same process:
``setpriv --pdeathsig TERM`` (the translator gets SIGTERM if the server
dies), ``prlimit`` (the configured resource limits, soft and hard, inherited
by make, gcc and ld) and ``setsid`` (a process group of its own, so that a
kill reaches make and the compilers too), then, unless the server runs
without one, the sandbox (:mod:`stapsrv.compile.sandbox`): ``bwrap`` stays
in that process group and dies with it, and its PID namespace ends every
process of the compile when the translator exits.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from stapsrv.config.values import DEFAULT_MAX_OUTPUT, TranslatorLimits
from stapsrv.core.programs import KILL_GRACE, NICE, PRLIMIT, SETPRIV, SETSID
from stapsrv.reactor import IHandlerReactor

#: Seconds the output pipes may stay open once the translator's group is
#: gone; then the server stops reading them.
OUTPUT_GRACE = 5.0


class OutputFile:
    """One output stream of the translator, written to a file as it comes
    and cut at ``limit`` bytes (what comes after is counted, not kept)."""

    def __init__(self, path: Path, limit: int, append: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        self._fd: int | None = os.open(path, flags | (os.O_APPEND if append else os.O_TRUNC),
                                       0o600)
        self.limit = limit
        self.written = 0
        self.dropped = 0

    @property
    def cut(self) -> bool:
        return self.dropped > 0

    def write(self, data: bytes) -> None:
        room = max(0, self.limit - self.written)
        kept = memoryview(data)[:room]
        self.dropped += len(data) - len(kept)
        while kept and self._fd is not None:
            done = os.write(self._fd, kept)
            self.written += done
            kept = kept[done:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _TranslatorProtocol(ProcessProtocol):
    def __init__(self, outputs: Mapping[int, OutputFile],
                 on_cut: Callable[[], None] = lambda: None) -> None:
        self.outputs = outputs
        self._on_cut = on_cut
        self.exited: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        output = self.outputs.get(childFD)
        if output is None:
            return
        was_cut = output.cut
        try:
            output.write(data)
        except OSError:
            # No room on disk: the rest is read and dropped (not counted as
            # cut: the translator meets the full disk itself and says so).
            output.close()
        if output.cut and not was_cut:
            self._on_cut()

    def processExited(self, reason: Failure) -> None:
        self.exited.callback(_status(reason))

    def processEnded(self, reason: Failure) -> None:
        for output in self.outputs.values():
            output.close()
        self.ended.callback(None)


def _close_output(protocol: ProcessProtocol) -> None:
    """Stop reading the translator's output pipes (its process is gone)."""
    transport = protocol.transport
    if transport is not None:
        for fd in (1, 2):
            transport.closeChildFD(fd)


def _status(reason: Failure) -> int:
    value = reason.value
    if isinstance(value, ProcessDone):
        return 0
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        return 128 + int(value.signal)
    if isinstance(value, ProcessTerminated) and value.exitCode is not None:
        return int(value.exitCode)
    return 1


class TranslatorRun:
    """One running translator; ``result`` fires with its exit status
    (``128 + signal`` when killed, as 4.8 reports it) once the translator
    has exited and nothing of its process group is left running."""

    log = Logger()

    def __init__(self, reactor: IReactorTime, pid: int, protocol: _TranslatorProtocol) -> None:
        self._reactor = reactor
        self.pid = pid
        self._protocol = protocol
        self._finished = False
        self._hard_kill: IDelayedCall | None = None
        self.result: Deferred[int] = Deferred()
        protocol.exited.addCallback(self._leader_exited)

    @property
    def cut_output(self) -> tuple[int, ...]:
        """The output streams (1, 2) cut at the output limit."""
        return tuple(fd for fd, output in sorted(self._protocol.outputs.items()) if output.cut)

    def _leader_exited(self, status: int) -> None:
        self._finished = True
        if self._hard_kill is not None and self._hard_kill.active():
            self._hard_kill.cancel()
        # Whatever the translator left behind (make and gcc, when it crashed
        # or was killed) must not go on writing into the scratch directory
        # (nor hold its output pipes open).
        if self._signal_group(signal.SIGKILL):
            self._wait_for_group(status, tries=25)
        else:
            self._done(status)

    def _wait_for_group(self, status: int, tries: int) -> None:
        try:
            os.killpg(self.pid, 0)
        except OSError:
            self._done(status)
            return
        # A zombie runs nothing: bwrap's PID 1 is one, orphaned until the
        # host's init reaps it (a second or more on some machines).
        if tries <= 0 or not live_group_members(self.pid):
            self._done(status)
            return
        self._reactor.callLater(0.02, self._wait_for_group, status, tries - 1)

    def _done(self, status: int) -> None:
        """Fire ``result`` once the output pipes are read to their end too,
        or ``OUTPUT_GRACE`` seconds on, when something that left the group
        (``setsid`` in a run without the sandbox) still holds them open."""
        protocol = self._protocol
        timer = self._reactor.callLater(OUTPUT_GRACE, _close_output, protocol)

        def ended(_: None) -> None:
            if timer.active():
                timer.cancel()
            self.result.callback(status)
        protocol.ended.addCallback(ended)

    def kill(self) -> None:
        """SIGTERM the whole process group, SIGKILL it if still there later."""
        if self._finished or self._hard_kill is not None:
            return
        self._signal_group(signal.SIGTERM)
        self._hard_kill = self._reactor.callLater(KILL_GRACE, self._kill_hard)

    def _kill_hard(self) -> None:
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> bool:
        """Signal the group; whether any process of it was there."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        except OSError as exc:
            self.log.warn("Cannot signal translator group {pid}: {error}",
                          pid=self.pid, error=exc)
            return False
        return True


def live_group_members(pgid: int, proc: Path = Path("/proc")) -> list[int]:
    """The processes of group ``pgid`` that are not zombies, from ``proc``
    (a process that vanishes while it is read is not counted)."""
    live = []
    try:
        entries = [entry for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            stat = (proc / entry / "stat").read_bytes()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 3 and fields[2] == str(pgid).encode() and fields[0] not in b"ZX":
            live.append(int(entry))
    return live


def launcher(limits: TranslatorLimits) -> list[str]:
    """The words put before the translator's own command line."""
    words = [SETPRIV, "--pdeathsig", "TERM", "--"]
    flags = limits.prlimit_flags()
    if flags:
        words += [PRLIMIT, *flags, "--"]
    if limits.niceness:
        words += [NICE, "-n", str(limits.niceness)]
    return words + [SETSID, "--wait", "--"]


#: Linux refuses exec when one string is longer than this (MAX_ARG_STRLEN).
_MAX_ARGUMENT = 32 * 4096


def check_exec_size(command: Sequence[str], env: Mapping[str, str]) -> None:
    """Raise E2BIG here, where it can be answered, for a command line that
    exec would refuse (Twisted would report that from the forked child)."""
    strings = [os.fsencode(word) for word in command]
    strings += [os.fsencode(f"{name}={value}") for name, value in env.items()]
    total = sum(len(string) + 1 + 8 for string in strings)  # bytes plus pointer
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        limit = 2 * 1024 * 1024
    if total > limit - 4096 or any(len(string) >= _MAX_ARGUMENT for string in strings):
        raise OSError(errno.E2BIG, "Argument list too long")


def start_translator(
    reactor: IHandlerReactor,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    stdout_path: Path,
    stderr_path: Path,
    limits: TranslatorLimits = TranslatorLimits(),
    sandbox: Sequence[str] = (),
    output_limit: int = DEFAULT_MAX_OUTPUT,
) -> TranslatorRun:
    """Start ``argv`` with output to the given files (stderr appended to),
    each cut at ``output_limit`` bytes (then the translator is stopped),
    inside ``sandbox`` (bwrap's words up to ``--``, when given).  Raises
    ``OSError`` when it cannot be started."""
    command = launcher(limits) + list(sandbox) + list(argv)
    check_exec_size(command, env)
    stdin_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    outputs: dict[int, OutputFile] = {}
    runs: list[TranslatorRun] = []
    try:
        outputs[1] = OutputFile(stdout_path, output_limit)
        outputs[2] = OutputFile(stderr_path, output_limit, append=True)
        protocol = _TranslatorProtocol(outputs, lambda: runs[0].kill() if runs else None)
        process = reactor.spawnProcess(
            protocol,
            command[0],
            command,
            env=dict(env),
            path=str(cwd),
            childFDs={0: stdin_fd, 1: "r", 2: "r"},
        )
    except BaseException:
        for output in outputs.values():
            output.close()
        raise
    finally:
        os.close(stdin_fd)
    assert process.pid is not None  # just started
    run = TranslatorRun(reactor, process.pid, protocol)
    runs.append(run)
    return run
