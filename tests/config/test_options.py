"""The table of options (stapsrv.config.options): consistent, and every
option in it reaches a server the same way from twistd's command line, a
configuration file, and the manager (status file, then daemon arguments)."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
from twisted.trial.unittest import TestCase

from stapsrv.app import tap
from stapsrv.cli.arguments import DISTRIBUTED, parse
from stapsrv.cli.launch import daemon_arguments
from stapsrv.cli.show import render
from stapsrv.cli.usage import USAGE
from stapsrv.config.convert import server_config, settings_config
from stapsrv.config.files import (
    LIST_VARIABLES,
    SCALAR_VARIABLES,
    STOCK_FIELDS,
    GlobalConfig,
    ServerSettings,
    read_server_file,
    render_status,
)
from stapsrv.config.options import (
    FILE_OPTIONS,
    MANAGER_OPTIONS,
    OPTIONS,
    Count,
    Flag,
    Option,
    Switch,
    Words,
)
from stapsrv.config.secret import create_secret
from stapsrv.config.values import ServerConfig


class TableTests(TestCase):
    def test_names_variables_and_fields_are_unique_and_real(self) -> None:
        self.assertEqual(len({option.name for option in OPTIONS}), len(OPTIONS))
        variables = [option.variable for option in FILE_OPTIONS]
        self.assertEqual(len(set(variables)), len(variables))
        fields = [option.field for option in OPTIONS if option.field]
        self.assertEqual(len(set(fields)), len(fields))
        config_fields = {field.name for field in attrs.fields(ServerConfig)}
        self.assertLessEqual(set(fields), config_fields)
        for option in OPTIONS:
            self.assertFalse(set(variables) & set(LIST_VARIABLES), option)
            if option.manager or option.stock:
                self.assertIsNotNone(option.variable, option.name)
            if option.manager:
                self.assertEqual(option.scope, "server", option.name)
            self.assertEqual(option.stock, option.variable in STOCK_FIELDS, option.name)
            if option.usage:
                self.assertTrue(option.manager, option.name)
                self.assertIn(f"\t{option.usage}\n", USAGE)

    def test_derived_grammar_and_manager_flags(self) -> None:
        for option in FILE_OPTIONS:
            self.assertIn(option.variable, SCALAR_VARIABLES)
        self.assertEqual(DISTRIBUTED, tuple(option.name for option in MANAGER_OPTIONS))
        twistd = tap.Options()
        for option in OPTIONS:
            if isinstance(option.kind, Switch):
                self.assertIn(f"no-{option.name}", twistd.synonyms)
            else:
                self.assertIn(option.name, twistd.synonyms)


def sample(option: Option, base: Path) -> str:
    """A value, as text, other than the option's default."""
    texts = {"privileges": "stapusr,stapsys", "endpoint": "haproxy:tcp:5000",
             "metrics": "tcp:9642", "fleet-cache": "redis://127.0.0.1:6379/0",
             "fleet-secret": str(base / "secret"), "allow": "10.0.0.0/8 192.0.2.1",
             "proxy-from": "10.1.0.0/16", "fetch-releases": "6.1.0-*-amd64",
             "fetch-architectures": "arm64",
             "fleet-password-file": str(base / "password")}
    if option.name in texts:
        return texts[option.name]
    if isinstance(option.kind, Count):
        return str(option.kind.minimum + 3 if option.default != option.kind.minimum + 3
                   else option.kind.minimum + 4)
    if isinstance(option.kind, Switch):
        return "no"
    if isinstance(option.kind, Flag):
        return "yes"
    if isinstance(option.kind, Words):
        return "x"
    return str(base / option.name)


class RoundTripTests(TestCase):
    def setUp(self) -> None:
        self.patch(os, "geteuid", lambda: 1000)
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        create_secret(self.base / "secret")
        (self.base / "password").write_text("pw\n")
        (self.base / "password").chmod(0o600)

    def test_every_file_option_reaches_the_server_alike(self) -> None:
        conf = self.base / "a.conf"
        conf.write_text("".join(f"{option.variable}={sample(option, self.base)}\n"
                                for option in FILE_OPTIONS))
        settings = read_server_file(conf)
        from_file = settings_config(settings, GlobalConfig())
        # Each option changes something (the fleet cache needs its secret,
        # PROXY_FROM a haproxy: endpoint).
        base = ServerSettings().with_value("FLEET_SECRET", settings.get("FLEET_SECRET")) \
            .with_value("ENDPOINT", "haproxy:tcp:5001")
        for option in FILE_OPTIONS:
            assert option.variable is not None
            if option.name in ("fleet-secret", "fleet-password-file", "endpoint"):
                continue
            alone = base.with_value(option.variable, settings.get(option.variable))
            self.assertNotEqual(settings_config(alone, GlobalConfig()),
                                settings_config(base, GlobalConfig()), option.name)
        # The status file keeps every value; the daemon's arguments say the same.
        status = self.base / "1.stat"
        status.write_text(render_status(settings))
        self.assertEqual(read_server_file(status), settings)
        arguments = daemon_arguments(settings, keep=False)
        options = tap.Options()
        options.parseOptions(arguments)
        self.assertEqual(options.to_config(), from_file)
        # The manager's command line sets the same values.
        words = ["start"] + [word for option in MANAGER_OPTIONS if option.name != "log"
                             for word in (f"--{option.name}", sample(option, self.base))]
        invocation = parse(words)
        for option in MANAGER_OPTIONS:
            if option.name != "log":
                self.assertEqual(invocation.distributed[option.name], [sample(option, self.base)])
        self.assertIn('--fleet-cache "redis://127.0.0.1:6379/0"', render(settings))

    def test_defaults_agree(self) -> None:
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options.to_config(), server_config())
        from_file = settings_config(ServerSettings(), GlobalConfig())
        self.assertEqual(attrs.evolve(from_file, log_file=None), server_config())
