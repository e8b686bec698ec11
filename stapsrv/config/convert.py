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
from typing import Any

from stapsrv.config.endpoints import DEFAULT_PROXY_FROM, proxied
from stapsrv.config.files import GlobalConfig, ServerSettings, configured_settings
from stapsrv.config.fleeturl import url_problem
from stapsrv.config.options import BY_KEY, FILE_OPTIONS, OPTIONS, SettingsError as SettingsError
from stapsrv.config.options import absolute_path
from stapsrv.config.secret import SECRET_COMMAND, SecretError, load_password, load_secret
from stapsrv.config.values import ServerConfig, TranslatorLimits
from stapsrv.core.cmdline import ServerOption
from stapsrv.core.policyvalues import PolicyError, parse_networks


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
        variable = BY_KEY[self.setting.replace("-", "_")].variable
        assert variable is not None
        return variable


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


def server_config(
    *,
    releases: Iterable[str] = (),
    server_options: Iterable[ServerOption] = (),
    arch: str | None = None,
    runtime: str | None = None,
    log_namespace: str = "stapsrv",
    **given: Any,
) -> ServerConfig:
    """A server's settings from 4.8's translator options and the checked
    values of the options in ``stapsrv.config.options.OPTIONS``, by their
    ``key`` (sizes of the limits and the cache in MiB, timeouts in seconds,
    paths as given; an option not given has its default).

    The running kernel's release is served first, as 4.8 does; build trees
    among ``releases`` count as their releases.  Raises ``SettingsError``
    (``FleetCacheError`` for the fleet cache settings; the fleet secret and
    password files are read to check them).
    """
    unknown = set(given) - set(BY_KEY)
    if unknown:
        raise TypeError(f"server_config() got unknown options {sorted(unknown)}")
    values = {option.key: given.get(option.key, option.initial) for option in OPTIONS}
    served = [os.uname().release]
    for release in releases:
        name = release_name(release)
        if name not in served:
            served.append(name)
    fields: dict[str, Any] = {}
    for option in OPTIONS:
        if option.field is not None:
            converted = option.convert(values[option.key])
            if converted is not None:
                fields[option.field] = converted
    fields.update(_joined(values, fields.get("endpoint")))
    return ServerConfig(releases=tuple(served), server_options=tuple(server_options),
                        arch=arch or None, runtime=runtime or None,
                        log_namespace=log_namespace, **fields)


def _joined(values: dict[str, Any], endpoint: str | None) -> dict[str, Any]:
    """The fields that several options make together."""
    if values["fleet_cache"]:
        check_fleet(values["fleet_cache"], values["fleet_secret"],
                    values["fleet_password_file"])
        fleet_files = {"fleet_secret": absolute_path(values["fleet_secret"]),
                       "fleet_password_file": absolute_path(values["fleet_password_file"])}
    else:
        fleet_files = {}
    memory = values["memory_limit"]
    file_size = values["file_size_limit"]
    return {
        "limits": TranslatorLimits(
            cpu_seconds=values["cpu_limit"], address_space=memory << 20 if memory else None,
            file_size=None if file_size is None else file_size << 20,
            processes=values["process_limit"]),
        "proxy_from": _proxy_networks(values["proxy_from"], endpoint),
        "fetch_symbols": values["fetch_symbols"] or values["fetch_debuginfo"],
        **fleet_files,
    }


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
    values = {option.key: option.from_variable(s.get(option.variable))
              for option in FILE_OPTIONS if option.variable is not None}
    values["log"] = values["log"] or str(global_config.log_file)
    try:
        return server_config(releases=s.releases, server_options=options, arch=s.arch,
                             runtime=s.runtime, keep=keep, log_namespace=log_namespace,
                             **values)
    except FleetCacheError as exc:
        raise SettingsError(f"{exc.variable}: {exc}") from None


def configured_servers(global_config: GlobalConfig) -> list[tuple[str, ServerSettings]]:
    """(name, settings) of every ``*.conf`` in name order, or the default server."""
    servers = [(settings.nickname or path.stem or str(index), settings)
               for index, (path, settings) in enumerate(configured_settings(global_config))]
    return servers or [("default", ServerSettings())]
