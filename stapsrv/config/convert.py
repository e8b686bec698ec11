"""From ``stap-server`` configuration files to running servers' settings.

``twistd stap-server --config FILE`` runs, in one process, every server
that the global file's ``CONFIG_PATH/*.conf`` describes (or the one default
server when there are none), the way ``stap-server start`` would start
them as separate processes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from stapsrv.cache.fleet import url_problem
from stapsrv.config.files import GlobalConfig, ServerSettings, read_server_file
from stapsrv.config.values import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_COMPILE_TIMEOUT,
    DEFAULT_MAX_COMPRESSED_REQUEST,
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_REQUEST_TIMEOUT,
    ServerConfig,
    TranslatorLimits,
)
from stapsrv.core.cmdline import ServerOption
from stapsrv.paths import default_server_ssl_dir


class SettingsError(ValueError):
    pass


def release_of_build_tree(path: str) -> str:
    """The release a kernel build tree was configured for."""
    try:
        return (Path(path) / "include" / "config" / "kernel.release").read_text().strip()
    except OSError as exc:
        raise SettingsError(f"Cannot read the kernel release of build tree {path}: "
                            f"{exc.strerror}") from None


def _number(text: str, name: str, default: int | None, minimum: int) -> int | None:
    if not text:
        return default
    if not re.fullmatch(r"\d+", text) or int(text) < minimum:
        raise SettingsError(f"{name}={text} is not a whole number of at least {minimum}")
    return int(text)


def robustness_fields(*, request_timeout: int, compile_timeout: int, cpu_limit: int | None,
                      memory_limit: int | None, file_size_limit: int | None,
                      process_limit: int | None, cache: bool, cache_dir: str | None,
                      cache_size: int, fleet_cache: str | None) -> dict[str, Any]:
    """The timeout, limit and cache fields of a ServerConfig, from checked
    numbers (sizes in MiB), as the command line and the variables give them."""
    if fleet_cache:
        problem = url_problem(fleet_cache)
        if problem is not None:
            raise SettingsError(problem)

    def mebibytes(value: int | None) -> int | None:
        return None if value is None else value << 20

    return {
        "request_timeout": float(request_timeout),
        "compile_timeout": float(compile_timeout),
        "limits": TranslatorLimits(cpu_seconds=cpu_limit,
                                   address_space=mebibytes(memory_limit),
                                   file_size=mebibytes(file_size_limit),
                                   processes=process_limit),
        "cache_enabled": cache,
        "cache_dir": Path(cache_dir).absolute() if cache_dir else None,
        "cache_size": cache_size << 20,
        "fleet_cache": fleet_cache or None,
    }


def robustness(settings: ServerSettings) -> dict[str, Any]:
    """Timeouts, translator limits and cache settings from our variables."""
    s = settings
    cache = s.cache.lower()
    if cache not in ("", "yes", "no", "on", "off", "1", "0", "true", "false"):
        raise SettingsError(f"CACHE={s.cache} is not yes or no")
    numbers = {
        "request_timeout": _number(s.request_timeout, "REQUEST_TIMEOUT",
                                   int(DEFAULT_REQUEST_TIMEOUT), 0) or 0,
        "compile_timeout": _number(s.compile_timeout, "COMPILE_TIMEOUT",
                                   int(DEFAULT_COMPILE_TIMEOUT), 0) or 0,
        "cpu_limit": _number(s.cpu_limit, "CPU_LIMIT", None, 1),
        "memory_limit": _number(s.memory_limit, "MEMORY_LIMIT", None, 1),
        "file_size_limit": _number(s.file_size_limit, "FILE_SIZE_LIMIT", None, 1),
        "process_limit": _number(s.process_limit, "PROCESS_LIMIT", None, 1),
        "cache_size": _number(s.cache_size, "CACHE_SIZE", DEFAULT_CACHE_SIZE >> 20, 1)
        or DEFAULT_CACHE_SIZE >> 20,
    }
    try:
        return robustness_fields(cache=cache not in ("no", "off", "0", "false"),
                                 cache_dir=s.cache_dir or None,
                                 fleet_cache=s.fleet_cache or None, **numbers)
    except SettingsError as exc:
        raise SettingsError(f"FLEET_CACHE: {exc}") from None


def server_config(settings: ServerSettings, global_config: GlobalConfig,
                  log_namespace: str = "stapsrv", keep: bool = False) -> ServerConfig:
    running = os.uname().release
    releases = [running]
    for release in settings.releases:
        name = release_of_build_tree(release) if release.startswith("/") else release
        if name not in releases:
            releases.append(name)
    options = [ServerOption("-a", settings.arch)] if settings.arch else []
    options += [ServerOption("-I", value) for value in settings.includes]
    options += [ServerOption("-D", value) for value in settings.defines]
    options += [ServerOption("-B", value) for value in settings.builds]
    if settings.runtime:
        options.append(ServerOption("-R", settings.runtime))
    port = _number(settings.port, "PORT", 0, 0)
    if port is not None and port > 65535:
        raise SettingsError(f"PORT={settings.port} is not a port number")
    extra = {}
    threads = _number(settings.max_threads, "MAXTHREADS", None, 0)
    if threads is not None:
        extra["max_threads"] = threads
    return ServerConfig(
        releases=tuple(releases),
        ssl_dir=Path(settings.ssl) if settings.ssl else default_server_ssl_dir(),
        server_options=tuple(options),
        arch=settings.arch or None,
        runtime=settings.runtime or None,
        port=port or 0,
        log_file=Path(settings.log or global_config.log_file),
        max_request_size=_number(settings.max_request_size, "MAXREQSIZE",
                                 DEFAULT_MAX_REQUEST_SIZE, 1) or DEFAULT_MAX_REQUEST_SIZE,
        max_compressed_request=_number(settings.max_compressed_request, "MAXCOMPRESSEDREQ",
                                       DEFAULT_MAX_COMPRESSED_REQUEST, 1)
        or DEFAULT_MAX_COMPRESSED_REQUEST,
        keep_temporary=keep,
        log_namespace=log_namespace,
        **extra,  # type: ignore[arg-type]
        **robustness(settings),
    )


def configured_servers(global_config: GlobalConfig) -> list[tuple[str, ServerSettings]]:
    """(name, settings) of every ``*.conf`` in name order, or the default server."""
    try:
        paths = sorted(p for p in global_config.config_path.glob("*.conf") if p.is_file())
    except OSError:
        paths = []
    servers = []
    for index, path in enumerate(paths):
        settings = read_server_file(path)
        name = settings.nickname or path.stem or str(index)
        servers.append((name, settings))
    return servers or [("default", ServerSettings())]
