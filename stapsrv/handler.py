"""What the server does with one request archive, start to finish.

``RequestHandler.handle`` unpacks the request into a scratch directory
under ``$TMPDIR``, runs the translator the way 4.8 does, signs the module
for unprivileged users, and returns the response archive (or ``None`` when
4.8 would close the connection without an answer).  File work runs in the
thread pool; the translator is spawned from the reactor thread.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from stapsrv import PROTOCOL_VERSION, mok
from stapsrv.archive import RequestRejected, build_response, extract_request, refusal_archive
from stapsrv.certs import ServerIdentity
from stapsrv.cmdline import Privilege, ServerOption, requested_privilege, translator_argv
from stapsrv.config import ServerConfig
from stapsrv.request import (
    LOCALE_PROTOCOL,
    read_arguments,
    read_client_version,
    read_locale,
    read_target_release,
    version_key,
)
from stapsrv.signing import sign_module_file
from stapsrv.translator import TranslatorRun, start_translator

T = TypeVar("T")

#: The translator's --tmpdir, a name the client and the testsuite rely on.
MODULE_DIR = "stap000000"


def server_home(environ: Mapping[str, str]) -> str:
    """The home directory the translator sees (its cache lives there)."""
    home = environ.get("HOME")
    if home:
        return home
    return pwd.getpwuid(os.getuid()).pw_dir


@define(eq=False)
class RequestContext:
    """One request's link back to its connection."""

    peer: str
    abandoned: bool = False
    _translator: TranslatorRun | None = None

    def abandon(self) -> None:
        """The client went away: stop any compile now."""
        self.abandoned = True
        if self._translator is not None:
            self._translator.kill()


@define(eq=False)
class RequestHandler:
    config: ServerConfig
    reactor: Any
    pool: ThreadPool
    identity: Callable[[], ServerIdentity]
    runtimes: Mapping[str, str] = field(factory=dict)
    environ: Mapping[str, str] = field(factory=lambda: dict(os.environ))
    log: Logger = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.log = Logger(namespace=self.config.log_namespace, source=self)

    def _in_thread(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.pool, function, *args)

    async def handle(self, body: bytes, context: RequestContext) -> bytes | None:
        scratch = await self._in_thread(_make_scratch, self.config.tmpdir)
        try:
            try:
                await self._in_thread(_unpack, scratch, body, self.config.max_request_size)
            except RequestRejected as exc:
                self.log.info("{message}", message=str(exc))
                self.log.info("Error processing client request")
                if exc.client_message is None:
                    return None
                return refusal_archive(exc.client_message, PROTOCOL_VERSION)
            await self._process(scratch, context)
            if context.abandoned:
                return None
            return await self._in_thread(build_response, scratch / "response")
        finally:
            if self.config.keep_temporary:
                self.log.info("Keeping temporary directory {directory}", directory=scratch)
            else:
                await self._in_thread(shutil.rmtree, scratch, True)

    async def _process(self, scratch: Path, context: RequestContext) -> None:
        request_dir = scratch / "request"
        response_dir = scratch / "response"
        (response_dir / "version").write_text(PROTOCOL_VERSION)

        client_version = read_client_version(request_dir)
        self.log.info("Client version is {version}", version=client_version)

        release = read_target_release(request_dir)
        if release is None:
            self.log.info("Unable to read sysinfo")
            self._refuse(response_dir, "Server: The request does not name a kernel "
                         "release (its sysinfo is missing or unreadable).")
            return
        if release not in self.config.releases:
            self.log.info("Target kernel version {release} is not supported by this server",
                          release=release)
            self._refuse(response_dir, (
                f"Server: This server does not build modules for kernel release '{release}'.\n"
                f"Server: It serves: {', '.join(self.config.releases)}."))
            return

        arguments = [os.fsdecode(argument) for argument in read_arguments(request_dir)]
        self.log.info("Options passed from the client: {arguments}",
                      arguments="".join(argument + " " for argument in arguments))

        env = dict(self.environ)
        env["TMPDIR"] = str(scratch)
        client_moks: tuple[str, ...] = ()
        if version_key(client_version) >= version_key(LOCALE_PROTOCOL):
            locale = read_locale(request_dir)
            env.update(locale.variables)
            complaints = list(locale.complaints)
            mok_file = request_dir / "mok_fingerprints"
            if mok_file.is_file():
                parsed = mok.parse_client_fingerprints(mok_file.read_bytes())
                client_moks = parsed.fingerprints
                complaints += parsed.complaints
            if complaints:
                with open(response_dir / "stderr", "a", encoding="utf-8") as stderr:
                    stderr.write("".join(line + "\n" for line in complaints))

        module_dir = response_dir / MODULE_DIR
        module_dir.mkdir(mode=0o700)
        argv = translator_argv(
            self.config.stap, release, self._server_options(release), str(module_dir),
            arguments)
        self.log.debug("Running {argv}", argv=argv)
        if context.abandoned:
            return
        try:
            run = start_translator(
                self.reactor, argv, env, request_dir,
                response_dir / "stdout", response_dir / "stderr")
        except OSError as exc:
            self.log.error("Failed spawning translator: {error}", error=exc)
            return
        context._translator = run
        status = await run.result
        context._translator = None
        if context.abandoned:
            return

        privilege = requested_privilege(argv[1:])
        if privilege.invalid_value is not None:
            self.log.info("Invalid argument '{value}' for --privilege",
                          value=privilege.invalid_value)
        await self._in_thread(
            self._finish, response_dir, module_dir, status, privilege.privilege,
            client_version, release, client_moks)

    def _server_options(self, release: str) -> list[ServerOption]:
        options = list(self.config.server_options)
        if self.config.runtime is None and release in self.runtimes:
            options.append(ServerOption("-R", self.runtimes[release]))
        if self.config.keep_temporary:
            # As 4.8: the translator keeps its whole build tree too.
            options.append(ServerOption("-k"))
        return options

    def _refuse(self, response_dir: Path, message: str) -> None:
        """Answer with rc 1 and a message, where 4.8 sent only ``version``."""
        (response_dir / "rc").write_text("1")
        (response_dir / "stdout").write_text("")
        with open(response_dir / "stderr", "a", encoding="utf-8") as stderr:
            stderr.write(message + "\n")

    def _finish(self, response_dir: Path, module_dir: Path, status: int,
                privilege: Privilege, client_version: str, release: str = "",
                client_moks: tuple[str, ...] = ()) -> None:
        """Blocking tail of a request: signatures, ``rc``, path filtering."""
        unprivileged = privilege in (Privilege.STAPUSR, Privilege.STAPSYS)
        if status == 0 and (unprivileged or client_moks):
            module = self._single_module(module_dir)
            if module is not None and unprivileged:
                self._sign(module)
            if module is not None and client_moks:
                status = self._mok_sign(module, release, client_moks, response_dir)
        uprobes = module_dir / "uprobes" / "uprobes.ko"
        if uprobes.is_file() and uprobes.stat().st_size > 0:
            if privilege != Privilege.STAPDEV:
                self._sign(uprobes)
            if version_key(client_version) < version_key(LOCALE_PROTOCOL):
                shutil.copyfile(uprobes, response_dir / "uprobes.ko")
        (response_dir / "rc").write_text(str(status))
        replacements = sorted({server_home(self.environ), str(response_dir)} - {"/"}, key=len, reverse=True)
        for name in ("stdout", "stderr"):
            _replace_in_file(response_dir / name, replacements, "<server>")

    def _single_module(self, module_dir: Path) -> Path | None:
        modules = sorted(module_dir.glob("*.ko"))
        if not modules:
            self.log.info("Unable to find a module in {directory}", directory=module_dir)
        elif len(modules) > 1:
            self.log.info("Too many modules ({count}) in {directory}",
                          count=len(modules), directory=module_dir)
        else:
            return modules[0]
        return None

    def _mok_sign(self, module: Path, release: str, client_moks: tuple[str, ...],
                  response_dir: Path) -> int:
        """Sign with a MOK the client has enrolled, or (as 4.8) send it one
        of ours to enroll and fail the request.  Returns the new ``rc``."""
        store = self.config.mok_store or mok.default_store(dict(self.environ))
        ours = mok.server_moks(store)
        common = next((name for name in client_moks if name in ours), None)
        messages = []
        status = 0
        if common is not None:
            problem = mok.sign_module(Path("/lib/modules") / release / "build",
                                      store / common, module)
            if problem is not None:
                messages.append(problem)
                status = 1
        else:
            messages.append(mok.NO_MATCH)
            offered = ours[0] if ours else mok.generate(store)
            shutil.copyfile(store / offered / mok.CERTIFICATE,
                            response_dir / mok.CERTIFICATE)
            messages.append(mok.SENT_CERTIFICATE)
            status = 1
        if messages:
            with open(response_dir / "stderr", "a", encoding="utf-8") as stderr:
                stderr.write("".join(message + "\n" for message in messages))
        return status

    def _sign(self, module: Path) -> None:
        try:
            sign_module_file(self.identity().key, module)
        except OSError as exc:
            self.log.error("Unable to sign {module}: {error}", module=module, error=exc)


def _make_scratch(tmpdir: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="stap-server.", dir=tmpdir))
    (scratch / "request").mkdir(mode=0o700)
    (scratch / "response").mkdir(mode=0o700)
    return scratch


def _unpack(scratch: Path, body: bytes, max_size: int) -> None:
    fd = os.open(scratch / "request.zip", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(body)
    extract_request(body, scratch / "request", max_size)


def _replace_in_file(path: Path, needles: list[str], replacement: str) -> None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    new = data
    for needle in needles:
        new = new.replace(os.fsencode(needle), replacement.encode())
    if new != data:
        path.write_bytes(new)
