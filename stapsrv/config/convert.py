"""The one way to a ``ServerConfig``: from checked values, which the
``twistd stap-server`` options give directly and the configuration files
give as text (``twistd stap-server --config FILE`` runs, in one process,
every server that the global file's ``CONFIG_PATH/*.conf`` describes, or
the one default server when there are none, the way ``stap-server start``
would start them as separate processes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from attrs import evolve

from stapsrv.config.endpoints import DEFAULT_PROXY_FROM, EndpointError, check, proxied
from stapsrv.config.files import (
    SWITCH_NO,
    SWITCH_YES,
    GlobalConfig,
    ServerSettings,
    configured_settings,
)
from stapsrv.config.fleeturl import url_problem
from stapsrv.config.secret import SECRET_COMMAND, SecretError, load_password, load_secret
from stapsrv.config.values import (
    DEFAULT_ADDRESS_SPACE,
    DEFAULT_CACHE_SIZE,
    DEFAULT_COMPILE_TIMEOUT,
    DEFAULT_DESCRIPTOR_RESERVE,
    DEFAULT_KERNEL_STORE_SIZE,
    DEFAULT_LISTEN_BACKLOG,
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_FETCHES,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_PEER_FETCHES,
    DEFAULT_REQUEST_TIMEOUT,
    ServerConfig,
    TranslatorLimits,
    default_listen,
)
from stapsrv.core.cmdline import ALL_PRIVILEGES, ServerOption
from stapsrv.core.policyvalues import PolicyError, parse_networks, parse_privileges
from stapsrv.paths import default_server_ssl_dir

#: Defaults of the sizes counted in MiB, and of the timeouts, in whole units.
DEFAULT_CACHE_MIB = DEFAULT_CACHE_SIZE >> 20
DEFAULT_KERNEL_STORE_MIB = DEFAULT_KERNEL_STORE_SIZE >> 20
DEFAULT_REQUEST_SECONDS = int(DEFAULT_REQUEST_TIMEOUT)
DEFAULT_COMPILE_SECONDS = int(DEFAULT_COMPILE_TIMEOUT)
DEFAULT_MEMORY_MIB = DEFAULT_ADDRESS_SPACE >> 20
DEFAULT_MAX_OUTPUT_MIB = DEFAULT_MAX_OUTPUT >> 20


class SettingsError(ValueError):
    """A value no server can run with; the message says which and why."""


class FleetCacheError(SettingsError):
    """A fleet cache setting no server can use: ``setting`` is its option
    (``fleet-cache``, ``fleet-secret``, ``fleet-password-file``), for the
    caller to name its source."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting

    @property
    def variable(self) -> str:
        """The configuration variable of ``setting``."""
        return self.setting.upper().replace("-", "_")


def check_fleet(url: str, secret: str | None, password_file: str | None) -> None:
    """Raise ``FleetCacheError`` unless a server can use this fleet cache:
    a Redis URL without a password, and a fleet secret (and password file,
    when named) that only the server's user may read."""
    problem = url_problem(url)
    if problem is not None:
        raise FleetCacheError("fleet-cache", problem)
    if not secret:
        raise FleetCacheError(
            "fleet-secret", "a fleet cache needs the fleet's secret, to authenticate its "
            f"entries: make one with {SECRET_COMMAND}, copy it to every server of the "
            "fleet, and name it with --fleet-secret FILE (FLEET_SECRET=FILE)")
    try:
        load_secret(Path(secret))
    except SecretError as exc:
        raise FleetCacheError("fleet-secret", str(exc)) from None
    if password_file:
        try:
            load_password(Path(password_file))
        except SecretError as exc:
            raise FleetCacheError("fleet-password-file", str(exc)) from None


def release_of_build_tree(path: str) -> str:
    """The release a kernel build tree was configured for."""
    try:
        return (Path(path) / "include" / "config" / "kernel.release").read_text().strip()
    except OSError as exc:
        raise SettingsError(f"Cannot read the kernel release of build tree {path}: "
                            f"{exc.strerror}") from None


def release_name(release: str) -> str:
    """A release as given: a name, or a build tree (an absolute path)."""
    return release_of_build_tree(release) if release.startswith("/") else release


def _mebibytes(value: int | None) -> int | None:
    return None if value is None else value << 20


def _limit_mebibytes(value: int) -> int | None:
    """A limit in MiB where 0 means none."""
    return value << 20 if value else None


def _absolute(path: str | None) -> Path | None:
    return Path(path).absolute() if path else None


def server_config(
    *,
    releases: Iterable[str] = (),
    server_options: Iterable[ServerOption] = (),
    arch: str | None = None,
    runtime: str | None = None,
    port: int = 0,
    listen: str | None = None,
    ssl: str | None = None,
    log: str | None = None,
    max_threads: int | None = None,
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
    max_compressed_request: int = DEFAULT_MAX_COMPRESSED_REQUEST,
    keep: bool = False,
    request_timeout: int = DEFAULT_REQUEST_SECONDS,
    compile_timeout: int = DEFAULT_COMPILE_SECONDS,
    cpu_limit: int | None = None,
    memory_limit: int = DEFAULT_MEMORY_MIB,
    file_size_limit: int | None = None,
    process_limit: int | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT_MIB,
    listen_backlog: int = DEFAULT_LISTEN_BACKLOG,
    max_peer_connections: int | None = None,
    descriptor_reserve: int = DEFAULT_DESCRIPTOR_RESERVE,
    cache: bool = True,
    sandbox: bool = True,
    allow: Iterable[str] = (),
    refuse_guru: bool = False,
    privileges: str | None = None,
    cache_dir: str | None = None,
    cache_size: int = DEFAULT_CACHE_MIB,
    fleet_cache: str | None = None,
    fleet_secret: str | None = None,
    fleet_password_file: str | None = None,
    counters_file: str | None = None,
    endpoint: str | None = None,
    proxy_from: Iterable[str] = (),
    metrics: str | None = None,
    fetch: bool = True,
    fetch_releases: Iterable[str] = (),
    kernel_store: str | None = None,
    kernel_store_size: int = DEFAULT_KERNEL_STORE_MIB,
    max_fetches: int = DEFAULT_MAX_FETCHES,
    peer_fetches: int = DEFAULT_PEER_FETCHES,
    fetch_symbols: bool = True,
    fetch_debuginfo: bool = False,
    log_namespace: str = "stapsrv",
) -> ServerConfig:
    """A server's settings from checked numbers (sizes of the limits and the
    cache in MiB, timeouts in seconds) and paths as given.

    The running kernel's release is served first, as 4.8 does; build trees
    among ``releases`` count as their releases.  Raises ``SettingsError``
    (``FleetCacheError`` for the fleet cache settings; the fleet secret and
    password files are read to check them).
    """
    served = [os.uname().release]
    for release in releases:
        name = release_name(release)
        if name not in served:
            served.append(name)
    try:
        networks = tuple(str(network) for network in parse_networks(
            word for value in allow for word in re.split(r"[\s,]+", value) if word))
        levels = parse_privileges(privileges) if privileges else ALL_PRIVILEGES
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None
    try:
        endpoint = check(endpoint, "--endpoint") if endpoint else None
        metrics = check(metrics, "--metrics") if metrics else None
    except EndpointError as exc:
        raise SettingsError(str(exc)) from None
    proxies = _proxy_networks(proxy_from, endpoint)
    patterns = tuple(word for value in fetch_releases
                     for word in re.split(r"[\s,]+", value) if word)
    for pattern in patterns:
        if not re.fullmatch(r"[A-Za-z0-9.+_~*?\[\]-]+", pattern):
            raise SettingsError(f"Not a release pattern: {pattern!r} (letters, digits, "
                                ". + _ ~ - and the shell wildcards * ? [ ])")
    if fleet_cache:
        check_fleet(fleet_cache, fleet_secret, fleet_password_file)
    config = ServerConfig(
        releases=tuple(served),
        ssl_dir=(Path(ssl) if ssl else default_server_ssl_dir()).absolute(),
        server_options=tuple(server_options),
        arch=arch or None,
        runtime=runtime or None,
        port=port,
        listen=listen or default_listen(),
        log_file=_absolute(log),
        max_request_size=max_request_size,
        max_compressed_request=max_compressed_request,
        keep_temporary=keep,
        log_namespace=log_namespace,
        request_timeout=float(request_timeout),
        compile_timeout=float(compile_timeout),
        limits=TranslatorLimits(cpu_seconds=cpu_limit, address_space=_limit_mebibytes(memory_limit),
                                file_size=_mebibytes(file_size_limit), processes=process_limit),
        max_output=max_output << 20,
        listen_backlog=listen_backlog,
        max_peer_connections=max_peer_connections,
        descriptor_reserve=descriptor_reserve,
        cache_enabled=cache,
        sandbox=sandbox,
        allow=networks,
        refuse_guru=refuse_guru,
        privileges=levels,
        cache_dir=_absolute(cache_dir),
        cache_size=cache_size << 20,
        fleet_cache=fleet_cache or None,
        fleet_secret=_absolute(fleet_secret) if fleet_cache else None,
        fleet_password_file=_absolute(fleet_password_file) if fleet_cache else None,
        counters_file=_absolute(counters_file),
        endpoint=endpoint,
        proxy_from=proxies,
        metrics=metrics,
        fetch_kernels=fetch,
        fetch_patterns=patterns,
        kernel_store=_absolute(kernel_store),
        kernel_store_size=kernel_store_size << 20,
        max_fetches=max_fetches,
        peer_fetches=peer_fetches,
        fetch_symbols=fetch_symbols or fetch_debuginfo,
        fetch_debuginfo=fetch_debuginfo,
    )
    # Without a value, the default (the number of CPUs) stands.
    return config if max_threads is None else evolve(config, max_threads=max_threads)


def _proxy_networks(values: Iterable[str], endpoint: str | None) -> tuple[str, ...]:
    """``--proxy-from`` (words separated by commas or blanks), checked;
    none given: the default (loopback).  Only a ``haproxy:`` endpoint reads
    PROXY headers, so for another it is a mistake worth refusing."""
    words = [word for value in values for word in re.split(r"[\s,]+", value) if word]
    if not words:
        return DEFAULT_PROXY_FROM
    if not (endpoint and proxied(endpoint)):
        raise SettingsError(f"--proxy-from {','.join(words)}: only a haproxy: --endpoint "
                            "reads PROXY headers (give --endpoint haproxy:tcp:...)")
    try:
        return tuple(str(network) for network in parse_networks(words, "--proxy-from"))
    except PolicyError as exc:
        raise SettingsError(str(exc)) from None


# --- from the variables of a configuration file ---------------------------------


def _number(text: str, name: str, minimum: int) -> int | None:
    """A whole number of at least ``minimum``, or None for an empty value."""
    if not text:
        return None
    if not re.fullmatch(r"\d+", text) or int(text) < minimum:
        raise SettingsError(f"{name}={text} is not a whole number of at least {minimum}")
    return int(text)


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _switch(value: str, name: str, default: bool = True) -> bool:
    """A yes/no variable (empty: ``default``)."""
    if value.lower() not in SWITCH_NO + SWITCH_YES:
        raise SettingsError(f"{name}={value} is not yes or no")
    return default if not value else value.lower() not in SWITCH_NO


def settings_config(settings: ServerSettings, global_config: GlobalConfig,
                    log_namespace: str = "stapsrv", keep: bool = False) -> ServerConfig:
    """A configured server's settings (its ``*.conf`` variables)."""
    s = settings
    options = [ServerOption("-a", s.arch)] if s.arch else []
    options += [ServerOption("-I", value) for value in s.includes]
    options += [ServerOption("-D", value) for value in s.defines]
    options += [ServerOption("-B", value) for value in s.builds]
    if s.runtime:
        options.append(ServerOption("-R", s.runtime))
    port = _given(_number(s.port, "PORT", 0), 0)
    if port > 65535:
        raise SettingsError(f"PORT={s.port} is not a port number")
    try:
        return server_config(
            releases=s.releases, server_options=options, arch=s.arch, runtime=s.runtime,
            port=port, ssl=s.ssl, log=s.log or str(global_config.log_file),
            max_threads=_number(s.max_threads, "MAXTHREADS", 0),
            max_request_size=_given(_number(s.max_request_size, "MAXREQSIZE", 1),
                                    DEFAULT_MAX_REQUEST_SIZE),
            max_compressed_request=_given(
                _number(s.max_compressed_request, "MAXCOMPRESSEDREQ", 1),
                DEFAULT_MAX_COMPRESSED_REQUEST),
            keep=keep, log_namespace=log_namespace,
            request_timeout=_given(_number(s.request_timeout, "REQUEST_TIMEOUT", 0),
                                   DEFAULT_REQUEST_SECONDS),
            compile_timeout=_given(_number(s.compile_timeout, "COMPILE_TIMEOUT", 0),
                                   DEFAULT_COMPILE_SECONDS),
            cpu_limit=_number(s.cpu_limit, "CPU_LIMIT", 1),
            memory_limit=_given(_number(s.memory_limit, "MEMORY_LIMIT", 0),
                                DEFAULT_MEMORY_MIB),
            file_size_limit=_number(s.file_size_limit, "FILE_SIZE_LIMIT", 1),
            process_limit=_number(s.process_limit, "PROCESS_LIMIT", 1),
            max_output=_given(_number(s.max_output, "MAX_OUTPUT", 1), DEFAULT_MAX_OUTPUT_MIB),
            listen_backlog=_given(_number(s.listen_backlog, "LISTEN_BACKLOG", 1),
                                  DEFAULT_LISTEN_BACKLOG),
            max_peer_connections=_number(s.max_peer_connections, "MAX_PEER_CONNECTIONS", 0),
            descriptor_reserve=_given(_number(s.descriptor_reserve, "DESCRIPTOR_RESERVE", 1),
                                      DEFAULT_DESCRIPTOR_RESERVE),
            cache=_switch(s.cache, "CACHE"), sandbox=_switch(s.sandbox, "SANDBOX"),
            allow=[s.allow], refuse_guru=_switch(s.refuse_guru, "REFUSE_GURU", default=False),
            privileges=s.privileges or None,
            cache_dir=s.cache_dir,
            cache_size=_given(_number(s.cache_size, "CACHE_SIZE", 1), DEFAULT_CACHE_MIB),
            fleet_cache=s.fleet_cache, fleet_secret=s.fleet_secret,
            fleet_password_file=s.fleet_password_file, endpoint=s.endpoint or None,
            proxy_from=[s.proxy_from], metrics=s.metrics or None,
            fetch=_switch(s.fetch_kernels, "FETCH_KERNELS"),
            fetch_releases=[s.fetch_releases], kernel_store=s.kernel_store or None,
            kernel_store_size=_given(_number(s.kernel_store_size, "KERNEL_STORE_SIZE", 1),
                                     DEFAULT_KERNEL_STORE_MIB),
            max_fetches=_given(_number(s.max_fetches, "MAX_FETCHES", 1), DEFAULT_MAX_FETCHES),
            peer_fetches=_given(_number(s.peer_fetches, "PEER_FETCHES", 0),
                                DEFAULT_PEER_FETCHES),
            fetch_symbols=_switch(s.fetch_symbols, "FETCH_SYMBOLS"),
            fetch_debuginfo=_switch(s.fetch_debuginfo, "FETCH_DEBUGINFO", default=False))
    except FleetCacheError as exc:
        raise SettingsError(f"{exc.variable}: {exc}") from None


def configured_servers(global_config: GlobalConfig) -> list[tuple[str, ServerSettings]]:
    """(name, settings) of every ``*.conf`` in name order, or the default server."""
    servers = [(settings.nickname or path.stem or str(index), settings)
               for index, (path, settings) in enumerate(configured_settings(global_config))]
    return servers or [("default", ServerSettings())]
