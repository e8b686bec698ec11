"""The stap-server manager: output formats (unit) and every action against
real servers run as the unprivileged test user (integration)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from stapsrv.kernel import prepared
from stapsrv.kernel.prepared import Preparation
from stapsrv.cli.manager import main
from stapsrv.cli.show import render, status_record
from stapsrv.cli.usage import USAGE
from stapsrv.config.files import ServerSettings
from stapsrv.core.counters import Counters
from stapsrv.paths import manager_architecture as host_arch
from stapsrv.vm import verification
from stapsrv.vm.verification import ProbeResult, Verification
from tests.helpers import require, require_header_release, require_program
from tests.helpers.realserver import (
    Client,
    owned_directory,
    remove_tree,
    scratch_directory,
    test_user,
)
from tests.helpers.waiting import is_dead, wait_until

MANAGER = str(Path(sys.executable).parent / "stap-server")


class FormatTests(TestCase):
    def test_render_like_48(self) -> None:
        settings = ServerSettings(
            arch="x86_64", user="root", builds=("'V=1 W=2'",), includes=("/x", "/y y"),
            defines=("A=1",), nickname="3006", releases=("6.1.0-56-amd64",),
            log="/var/log/stap-server/log", port="5101", runtime='/r"t\\')
        self.assertEqual(render(settings), (
            '-a "x86_64" -r "6.1.0-56-amd64" -R "/r\\"t\\\\" -D "A=1" -I "/x" -I "/y y" '
            '-B "\'V=1 W=2\'" -u "root" -n "3006" --log "/var/log/stap-server/log" '
            '--port "5101"'))
        self.assertNotIn("-n", render(settings, nickname=False))

    def test_status_record(self) -> None:
        settings = ServerSettings(user="stap-server", nickname="a", releases=("6.1",),
                                  log="/l", port="5000",
                                  extensions={"ENDPOINT": "haproxy:tcp:5000",
                                              "METRICS": "tcp:9642"})
        counters = Counters(requests=4, failures=1, cache_hits=2, compiling=1, waiting=0)
        record = status_record(settings, 42, "running", counters)
        self.assertEqual(record, {
            "command": f"stap-server {render(settings)}", "nickname": "a", "pid": 42,
            "state": "running", "user": "stap-server", "releases": ["6.1"], "port": 5000,
            "endpoint": "haproxy:tcp:5000", "proxy_from": ["127.0.0.0/8", "::1/128"],
            "metrics": "tcp:9642", "log": "/l", "sandbox": True,
            "counters": {"requests": 4, "failures": 1, "cache_hits": 2, "compiling": 1,
                         "waiting": 0}, "verified": [], "prepared": []})
        self.assertIsNone(status_record(ServerSettings(), None, "stopped", None)["counters"])
        # The proxies trusted: PROXY_FROM's words; none behind a plain endpoint.
        proxied = settings.with_value("PROXY_FROM", "10.1.0.0/16, 192.0.2.7")
        self.assertEqual(status_record(proxied, 42, "running", None)["proxy_from"],
                         ["10.1.0.0/16", "192.0.2.7/32"])
        self.assertIsNone(status_record(ServerSettings(extensions={"ENDPOINT": "tcp:5000"}), None, "stopped",
                                        None)["proxy_from"])
        self.assertIsNone(status_record(ServerSettings(), None, "stopped", None)["port"])

    def test_status_record_shows_verified_releases(self) -> None:
        store = Path(self.mktemp())
        found = Verification("6.1.0-57-amd64", 1700000000.0, "Systemtap translator 4.8",
                             (ProbeResult("4.8", "begin", True),
                              ProbeResult("5.5", "begin", False, "staprun exit 1: x")))
        verification.save(store, found)
        record = status_record(ServerSettings(extensions={"KERNEL_STORE": str(store)}), None, "stopped", None)
        self.assertEqual(record["verified"], [found.as_json()])
        self.assertEqual(record["verified"][0]["passed"], False)
        self.assertEqual(record["verified"][0]["results"][1]["failure"], "staprun exit 1: x")

    def test_status_record_shows_prepared_releases(self) -> None:
        store = Path(self.mktemp())
        found = Preparation("6.1.0-57-amd64", 1700000000.0, (("fetch", 7.0),), 1700000030.0,
                            by="host-a")
        prepared.save(store, found)
        record = status_record(ServerSettings(extensions={"KERNEL_STORE": str(store)}), None,
                               "stopped", None)
        self.assertEqual(record["prepared"], [found.as_json()])
        self.assertEqual((record["prepared"][0]["state"], record["prepared"][0]["to_ready"]),
                         ("ready", 30.0))

    def run_main(self, *words: str) -> tuple[str, str, int]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(words), out, err)
        return out.getvalue(), err.getvalue(), code

    def test_usage_reload_and_errors(self) -> None:
        out, err, code = self.run_main()
        self.assertEqual((out, code), (USAGE + "\n", 0))
        self.assertTrue(out.startswith("Usage: stap-server {start|stop|restart|condrestart|"
                                       "try-restart|force-reload|status} [options]\n"))
        self.assertEqual(self.run_main("bogus")[2], 0)
        self.assertEqual(self.run_main("reload"), ("\n", "", 3))
        out, err, code = self.run_main("start", "--bogus")
        self.assertEqual((err, code), ("Error: Argument parse error: --bogus\n", 2))
        self.assertTrue(out.startswith("Usage: stap-server"))

    def test_invalid_global_config_names_file_and_line(self) -> None:
        config = Path(self.mktemp())
        config.write_text("# ok\nSTAT_PATH=/tmp/x\nBOGUS=1\n")
        out, err, code = self.run_main("status", "-c", str(config))
        self.assertEqual(code, 1)
        self.assertEqual(err, f'Invalid input, "BOGUS=1", in {config.absolute()} (line 3)\n')


class Sandbox:
    """A global config with private CONFIG_PATH, STAT_PATH and LOG_FILE."""

    def __init__(self, test: TestCase) -> None:
        self.base = scratch_directory("manager-")
        test.addCleanup(remove_tree, self.base)
        test.addCleanup(self.stop_everything)
        owned_directory(self.base / "conf.d")
        self.ssl = owned_directory(self.base / "ssl")
        self.log = self.base / "log" / "log"
        self.global_file = self.base / "global"
        self.global_file.write_text(f"CONFIG_PATH={self.base / 'conf.d'}\n"
                                    f"STAT_PATH={self.base / 'run'}\nLOG_FILE={self.log}\n"
                                    f"STAP_USER={test_user().pw_name}\n")

    def run(self, action: str, *arguments: str, env: dict[str, str] | None = None
            ) -> tuple[str, str, int]:
        environment = {"PATH": os.environ["PATH"], "STAP_USER": test_user().pw_name,
                       "LANG": "C.UTF-8", "STAPSRV_LISTEN": "127.0.0.1"}
        environment.update(env or {})
        result = subprocess.run([MANAGER, action, "-c", str(self.global_file), *arguments],
                                capture_output=True, text=True, env=environment, timeout=180,
                                cwd="/")
        return result.stdout, result.stderr, result.returncode

    def status_files(self) -> list[Path]:
        return sorted((self.base / "run").glob("*.stat"))

    def pids(self) -> list[int]:
        return [int(p.stem) for p in self.status_files()]

    def stop_everything(self) -> None:
        self.run("stop")


class ManagerTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        require(os.geteuid() == 0, "manager integration tests start servers as another user")
        require_program("stap")
        self.sandbox = Sandbox(self)
        self.user = test_user().pw_name
        self.opts = (f'-a "{host_arch()}" -u "{self.user}"')

    def line(self, nickname: str = "", extra: str = "") -> str:
        text = f'stap-server {self.opts}'
        if nickname:
            text += f' -n "{nickname}"'
        return text + f' --log "{self.sandbox.log}"' + extra

    def test_nothing_running(self) -> None:
        self.assertEqual(self.sandbox.run("status"), ("No managed stap-server is running\n", "", 3))
        self.assertEqual(self.sandbox.run("stop"), ("Stopping stap-server: OK\n", "", 0))
        self.assertEqual(self.sandbox.run("condrestart"),
                         ("No managed stap-server is runningOK\n", "", 0))
        self.assertEqual(self.sandbox.run("try-restart")[2], 0)
        self.assertEqual(self.sandbox.run("stop", "-p", "1"),
                         ("No stap-server running as pid 1\n", "", 1))
        out, err, code = self.sandbox.run("stop", "-n", "nosuch")
        self.assertEqual((out, code), ("No configuration found for the nickname 'nosuch'\n"
                                       "FAILED\n", 1))
        self.assertEqual(self.sandbox.run("status", "-n", "nosuch"),
                         ("No configuration found for the nickname 'nosuch'\n", "", 3))
        out, err, code = self.sandbox.run("status", "-r", "/nonexistent")
        self.assertEqual(code, 2)
        self.assertIn("Missing /nonexistent/include/config/kernel.release", err)

    def test_lifecycle_of_the_default_server(self) -> None:
        ssl = f' --ssl "{self.sandbox.ssl}"'
        out, err, code = self.sandbox.run("start", "--ssl", str(self.sandbox.ssl))
        self.assertEqual((out, code), (f"Starting {self.line(extra=ssl)}\nOK\n", 0), err)
        [pid] = self.sandbox.pids()
        self.assertEqual(self.sandbox.status_files()[0].read_text(), (
            f"ARCH={host_arch()}\nUSER={self.user}\nNICKNAME={pid}\nRUNTIME=\n"
            f"LOG={self.sandbox.log}\nPORT=\nSSL={self.sandbox.ssl}\nMAXTHREADS=\n"
            "MAXREQSIZE=\nMAXCOMPRESSEDREQ=\n"))
        running = (f"{self.line(str(pid), ssl)} running as PID {pid}\n"
                   "  requests 0, failures 0, cache hits 0, compiling 0, waiting 0\n"
                   "  translators run in a bubblewrap sandbox\n")
        self.assertEqual(self.sandbox.run("status"), (running, "", 0))
        # Starting the same server again is a no-op that succeeds.
        self.assertEqual(self.sandbox.run("start", "--ssl", str(self.sandbox.ssl))[::2],
                         (f"Starting {self.line(extra=ssl)}\nOK\n", 0))
        self.assertEqual(self.sandbox.pids(), [pid])
        self.assertEqual(self.sandbox.run("status", "-p", str(pid)), (running, "", 0))
        # restart keeps the nickname (4.8 lost it).
        out, err, code = self.sandbox.run("restart")
        self.assertEqual(code, 0, err)
        [new_pid] = self.sandbox.pids()
        self.assertNotEqual(new_pid, pid)
        self.assertEqual(out, f"Stopping {self.line(str(pid), ssl)}\nOK\n"
                              f"Starting {self.line(str(pid), ssl)}\nOK\n")
        # condrestart restarts what runs.
        out, err, code = self.sandbox.run("condrestart")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.sandbox.pids()), 1)
        self.assertNotEqual(self.sandbox.pids(), [new_pid])
        out, err, code = self.sandbox.run("stop")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"^Stopping stap-server .* -n \"\d+\" .*\nOK\n$")
        self.assertEqual(self.sandbox.pids(), [])
        self.assertEqual(self.sandbox.run("status")[2], 3)
        self.assertEqual(self.sandbox.run("status", "--json")[:3:2], ('{\n  "servers": []\n}\n', 3))
        # restart with nothing running is a start; force-reload too.
        self.assertEqual(self.sandbox.run("restart", "--ssl", str(self.sandbox.ssl))[0],
                         f"Stopping stap-server: OK\nStarting {self.line(extra=ssl)}\nOK\n")
        out, err, code = self.sandbox.run("force-reload", "--ssl", str(self.sandbox.ssl))
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.sandbox.pids()), 1)
        self.assertIn(f"Starting {self.line(extra=ssl)}\nOK\n", out)

    def test_dead_server_with_a_stale_status_file(self) -> None:
        self.sandbox.run("start", "--ssl", str(self.sandbox.ssl))
        [pid] = self.sandbox.pids()
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: is_dead(pid)))
        out, err, code = self.sandbox.run("status")
        self.assertEqual(code, 1)
        self.assertRegex(out, rf"^stap-server .* started as PID {pid} is no longer running\n$")
        self.assertEqual(self.sandbox.pids(), [])
        self.assertEqual(self.sandbox.run("status")[2], 3)
        # condrestart never starts a stopped server.
        self.assertEqual(self.sandbox.run("condrestart")[2], 0)
        self.assertEqual(self.sandbox.pids(), [])

    def test_stop_and_restart_of_a_dead_server(self) -> None:
        ssl = str(self.sandbox.ssl)
        self.sandbox.run("start", "-n", "gone", "--ssl", ssl)
        [pid] = self.sandbox.pids()
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: is_dead(pid)))
        out, err, code = self.sandbox.run("restart")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith('Stopping stap-server') and '-n "gone"' in out, out)
        [new_pid] = self.sandbox.pids()
        self.assertNotEqual(new_pid, pid)
        self.assertIn('-n "gone"', self.sandbox.run("status")[0])
        os.kill(new_pid, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: is_dead(new_pid)))
        out, err, code = self.sandbox.run("stop")
        self.assertEqual((code, out.splitlines()[-1]), (0, "OK"))
        self.assertEqual(self.sandbox.pids(), [])
        # stopping a server that does not run succeeds
        out, err, code = self.sandbox.run("stop", "-r", "1.2.3-none")
        self.assertEqual((out.splitlines()[-1], code), ("OK", 0))
        self.assertIn('-r "1.2.3-none"', out)

    def test_several_servers_with_positional_port_and_log(self) -> None:
        other_log = self.sandbox.base / "log" / "b.log"
        ssl = str(self.sandbox.ssl)
        out, err, code = self.sandbox.run(
            "start", "-n", "a", "-n", "b", "-n", "c", "--port", "0", "--port", "0",
            "--log", str(self.sandbox.log), "--log", str(other_log),
            "--ssl", ssl, "--ssl", ssl, "--ssl", ssl)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count("\nOK"), 3, out)
        status, _, code = self.sandbox.run("status")
        self.assertEqual(code, 0)
        lines = [line for line in status.splitlines() if " running as PID " in line]
        self.assertEqual(len(lines), 3)
        self.assertEqual(status.count("\n  requests 0, failures 0, cache hits 0"), 3, status)
        by_name = {re.search(r'-n "(\w)"', line).group(1): line for line in lines}
        self.assertIn(f'--log "{other_log}" --port "0"', by_name["b"])
        self.assertIn(f'--log "{self.sandbox.log}"', by_name["c"])
        self.assertNotIn("--port", by_name["c"])
        out, err, code = self.sandbox.run("stop", "-n", "a", "-n", "c")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.sandbox.pids()), 1)
        self.assertIn('-n "b"', self.sandbox.run("status")[0])

    def test_configured_servers_and_nickname_lookup(self) -> None:
        conf = self.sandbox.base / "conf.d"
        (conf / "one.conf").write_text(
            f"# a configured server\nNICKNAME=native\nSSL={self.sandbox.ssl}\nARCH=\nUSER=\n"
            f"RELEASE=\nINCLUDE=/t1\nINCLUDE+=/t 2\nMAXTHREADS=1")
        out, err, code = self.sandbox.run("start")
        self.assertEqual(code, 0, err)
        self.assertIn('-I "/t1" -I "/t 2"', out)
        self.assertIn(f'-r "{os.uname().release}"', out)
        self.assertIn('-n "native"', out)
        status, _, code = self.sandbox.run("status", "-n", "native")
        self.assertEqual(code, 0)
        self.assertRegex(status, r'-n "native" .*--max-threads "1" running as PID \d+\n'
                                 r'  requests 0, failures 0, cache hits 0, compiling 0, '
                                 r'waiting 0\n  translators run in a bubblewrap sandbox\n$')
        (conf / "two.conf").write_text("PORT=1\nBOGUS=2\n")
        out, err, code = self.sandbox.run("start")
        self.assertEqual(code, 1)
        self.assertIn(f'Invalid input, "BOGUS=2", in {conf / "two.conf"} (line 2)', err)
        (conf / "two.conf").unlink()
        self.assertEqual(self.sandbox.run("stop", "-n", "native")[2], 0)
        self.assertEqual(self.sandbox.pids(), [])

    def test_every_option_reaches_the_server(self) -> None:
        runtime = owned_directory(self.sandbox.base / "runtime")
        out, err, code = self.sandbox.run(
            "start", "-a", "x86_64", "-r", "6.1.0-56-amd64", "-I", "/opt/taps", "-D", "A=1",
            "-B", "V=1", "-R", str(runtime), "-k", "--ssl", str(self.sandbox.ssl),
            "--max-threads", "3", "--max-request-size", "60000",
            "--max-compressed-request", "6000", "--port", "0", "--compile-timeout", "600",
            "--cpu-limit", "120", "--cache", "no", "--sandbox", "no",
            "--allow", "127.0.0.0/8", "--refuse-guru", "yes", "--privileges", "stapusr,stapdev",
            "--fetch", "no", "--fetch-releases", "6.1.0-*-amd64", "--fetch-suites", "trixie",
            "--fetch-architectures", "arm64", "--kernel-store",
            str(self.sandbox.base / "kernels"), "--kernel-store-size", "300",
            "--max-fetches", "3", "--peer-fetches", "2", "--fetch-symbols", "no")
        self.assertEqual(code, 0, err)
        self.assertIn(f'-a "x86_64" -r "6.1.0-56-amd64" -R "{runtime}" -D "A=1" -I "/opt/taps" '
                      f'-B "V=1" -u "{self.user}" --log "{self.sandbox.log}" --port "0" '
                      f'--ssl "{self.sandbox.ssl}" --max-threads "3" --max-request-size "60000" '
                      '--max-compressed-request "6000" --compile-timeout "600" '
                      '--cpu-limit "120" --cache "no" --sandbox "no" --allow "127.0.0.0/8" '
                      '--refuse-guru "yes" --privileges "stapusr,stapdev" --fetch "no" '
                      '--fetch-releases "6.1.0-*-amd64" --fetch-suites "trixie" '
                      '--fetch-architectures "arm64" --kernel-store '
                      f'"{self.sandbox.base / "kernels"}" --kernel-store-size "300" '
                      '--max-fetches "3" --peer-fetches "2" --fetch-symbols "no"', out)
        [pid] = self.sandbox.pids()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for word in (b"-I", b"/opt/taps", b"-D", b"A=1", b"-B", b"V=1", b"-R", b"-k",
                     b"--max-threads", b"3", b"--max-request-size", b"60000",
                     b"--max-compressed-request", b"6000", b"--compile-timeout", b"600",
                     b"--cpu-limit", b"120", b"--no-cache", b"--no-sandbox",
                     b"--allow", b"127.0.0.0/8", b"--refuse-guru", b"--privileges",
                     b"stapusr,stapdev", b"--no-fetch", b"--fetch-releases", b"6.1.0-*-amd64",
                     b"--fetch-suites", b"trixie", b"--fetch-architectures", b"arm64",
                     b"--kernel-store-size", b"300", b"--max-fetches", b"3",
                     b"--peer-fetches", b"2", b"--no-fetch-symbols"):
            self.assertIn(word, argv)
        self.assertIn("Response cache disabled", self.sandbox.log.read_text())
        self.assertIn("Translator sandbox disabled (--no-sandbox)", self.sandbox.log.read_text())
        self.assertIn("Using a maximum of 3 threads", self.sandbox.log.read_text())
        self.assertIn("\n  translators run without a sandbox (--sandbox no: 4.8's exposure)\n",
                      self.sandbox.run("status")[0])
        self.assertIn("Fetching kernel releases that are not installed is off (--no-fetch)",
                      self.sandbox.log.read_text())
        # try-restart restarts a running server and keeps its options.
        out, err, code = self.sandbox.run("try-restart")
        self.assertEqual(code, 0, err)
        [new_pid] = self.sandbox.pids()
        self.assertNotEqual(new_pid, pid)
        self.assertIn(b"60000", Path(f"/proc/{new_pid}/cmdline").read_bytes())

    def test_start_replaces_a_dead_server(self) -> None:
        ssl = str(self.sandbox.ssl)
        self.sandbox.run("start", "--ssl", ssl)
        [pid] = self.sandbox.pids()
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(wait_until(lambda: is_dead(pid)))
        out, err, code = self.sandbox.run("start", "--ssl", ssl)
        self.assertEqual(code, 0, err)
        [new_pid] = self.sandbox.pids()
        self.assertNotEqual(new_pid, pid)
        self.assertIn(f"running as PID {new_pid}", self.sandbox.run("status")[0])

    def test_i_serves_every_installed_kernel(self) -> None:
        out, err, code = self.sandbox.run("start", "-i", "--ssl", str(self.sandbox.ssl))
        self.assertEqual(code, 0, err)
        for release in sorted(os.listdir("/lib/modules")):
            self.assertIn(f'-r "{release}"', out)

    def test_root_is_refused(self) -> None:
        out, err, code = self.sandbox.run("start", "-u", "root", "--ssl", str(self.sandbox.ssl))
        self.assertEqual(code, 1)
        self.assertTrue(out.endswith("FAILED\n"), out)
        self.assertIn("servers never run as root", err)
        self.assertEqual(self.sandbox.pids(), [])

    def test_unwritable_status_directory(self) -> None:
        run = self.sandbox.base / "run"
        run.mkdir(exist_ok=True)
        os.chown(run, 0, 0)
        run.chmod(0o755)
        result = subprocess.run(
            ["setpriv", f"--reuid={test_user().pw_uid}", f"--regid={test_user().pw_gid}",
             "--init-groups", MANAGER, "start", "-c", str(self.sandbox.global_file)],
            capture_output=True, text=True, cwd="/", timeout=60,
            env={"PATH": os.environ["PATH"], "STAPSRV_LISTEN": "127.0.0.1"})
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"cannot write status files in {run} (STAT_PATH)", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_busy_port_is_a_failed_start(self) -> None:
        self.sandbox.run("start", "--ssl", str(self.sandbox.ssl))
        port = re.search(r"Using network address \[[^\]]*\]:(\d+)",
                         self.sandbox.log.read_text()).group(1)
        out, err, code = self.sandbox.run("start", "-n", "clash", "--port", port,
                                          "--ssl", str(self.sandbox.ssl))
        self.assertEqual(code, 1)
        self.assertTrue(out.endswith("FAILED\n"), out)
        self.assertIn("Error setting socket address", err)
        self.assertEqual(len(self.sandbox.pids()), 1)

    def test_fleet_cache_without_a_secret_does_not_start(self) -> None:
        out, err, code = self.sandbox.run("start", "--ssl", str(self.sandbox.ssl),
                                          "--fleet-cache", "redis://127.0.0.1:1/0")
        self.assertEqual(code, 1)
        self.assertTrue(out.endswith("FAILED\n"), out)
        self.assertIn("--fleet-secret: a fleet cache needs the fleet's secret", err)
        self.assertIn("python3 -m stapsrv.cli.fleet secret FILE", err)
        self.assertEqual(self.sandbox.pids(), [])

    def test_bad_proxy_from_does_not_start(self) -> None:
        out, err, code = self.sandbox.run("start", "--ssl", str(self.sandbox.ssl), "--endpoint",
                                          "haproxy:tcp:0:interface=127.0.0.1",
                                          "--proxy-from", "10.0.0.0/33")
        self.assertEqual(code, 1)
        self.assertTrue(out.endswith("FAILED\n"), out)
        self.assertIn("--proxy-from 10.0.0.0/33: not an address or network", err)
        self.assertEqual(self.sandbox.pids(), [])

    def test_status_shows_the_trusted_proxies(self) -> None:
        (self.sandbox.base / "conf.d" / "edge.conf").write_text(
            f"NICKNAME=edge\nSSL={self.sandbox.ssl}\nENDPOINT=haproxy:tcp:0:interface=127.0.0.1\n"
            "PROXY_FROM=10.0.0.0/8, 192.0.2.1\n")
        out, err, code = self.sandbox.run("start")
        self.assertEqual(code, 0, err)
        self.assertIn('--proxy-from "10.0.0.0/8, 192.0.2.1"', out)
        self.assertIn("believed from 10.0.0.0/8, 192.0.2.1/32 (--proxy-from)",
                      self.sandbox.log.read_text())
        status, _, code = self.sandbox.run("status", "-n", "edge")
        self.assertEqual(code, 0)
        self.assertIn("\n  PROXY headers believed from 10.0.0.0/8, 192.0.2.1/32 "
                      "(--proxy-from)\n", status)
        out, err, code = self.sandbox.run("status", "--json")
        [record] = json.loads(out)["servers"]
        self.assertEqual(record["proxy_from"], ["10.0.0.0/8", "192.0.2.1/32"])

    def test_fleet_password_is_on_no_command_line_status_or_log(self) -> None:
        from stapsrv.config.secret import create_secret
        from tests.helpers.realredis import make_tls_files, start_redis
        user = test_user()
        files = owned_directory(self.sandbox.base / "fleet")
        secret = files / "fleet.secret"
        create_secret(secret, owner=(user.pw_uid, user.pw_gid))
        password = "pw-manager-0c7d1e"
        password_file = files / "redis.password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        os.chown(password_file, user.pw_uid, user.pw_gid)
        store = start_redis(self, self.sandbox.base / "redis", password=password,
                            tls=make_tls_files(files / "tls"))
        out, err, code = self.sandbox.run(
            "start", "--ssl", str(self.sandbox.ssl), "--fleet-cache", store.url,
            "--fleet-secret", str(secret), "--fleet-password-file", str(password_file))
        self.assertEqual(code, 0, err)
        fleet = (f' --fleet-cache "{store.url}" --fleet-secret "{secret}" '
                 f'--fleet-password-file "{password_file}"')
        self.assertIn(fleet, out)
        [pid] = self.sandbox.pids()
        status, _, code = self.sandbox.run("status")
        self.assertEqual(code, 0)
        self.assertIn(fleet, status)
        status_file = self.sandbox.status_files()[0].read_text()
        self.assertIn(f"FLEET_PASSWORD_FILE={password_file}\n", status_file)
        log = self.sandbox.log.read_text()
        self.assertIn(f"Fleet cache {store.url} (entries authenticated with the secret in "
                      f"{secret})", log)
        for text in (out, err, status, status_file, log,
                     Path(f"/proc/{pid}/cmdline").read_text()):
            self.assertNotIn(password, text)

    async def test_real_client_sighup_and_stop_during_compile(self) -> None:
        release = require_header_release()
        out, err, code = self.sandbox.run("start", "-r", release, "--ssl", str(self.sandbox.ssl))
        self.assertEqual(code, 0, err)
        [pid] = self.sandbox.pids()
        port = re.search(r"Using network address \[[^\]]*\]:(\d+)",
                         self.sandbox.log.read_text()).group(1)
        client = Client(scratch_directory("mgr-client-"))
        self.addCleanup(remove_tree, client.dir)
        # logrotate (create mode): move the log away, create a new one owned by
        # the server user, SIGHUP: the server writes to the new one.
        rotated = self.sandbox.log.with_name("log.1")
        self.sandbox.log.rename(rotated)
        self.sandbox.log.touch()
        os.chown(self.sandbox.log, test_user().pw_uid, test_user().pw_gid)
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "Reopened the log file" in self.sandbox.log.read_text())
        self.assertIn("Reopened the log file", self.sandbox.log.read_text())
        await client.trust(f"127.0.0.1:{port}")
        self.assertIn("Accepted connection from", self.sandbox.log.read_text())
        self.assertNotIn("Accepted connection from", rotated.read_text())
        # Warm the server's translator cache (a first build may take 20 s), so
        # that the compile below is well inside the server's 30 s drain.
        warm = f'probe begin {{ println("warm {time.time()}"); exit() }}'
        out, err, code = await client.stap(f"--use-server=127.0.0.1:{port}", "-r", release,
                                           "-p4", "-e", warm)
        self.assertEqual(code, 0, err.decode())
        # The same request again is answered from the response cache, and
        # status counts both.
        out, err, code = await client.stap(f"--use-server=127.0.0.1:{port}", "-r", release,
                                           "-p4", "-e", warm)
        self.assertEqual(code, 0, err.decode())
        # The counters file is rewritten twice a second: wait for the figures.
        counted = "\n  requests 2, failures 0, cache hits 1, compiling 0, waiting 0\n"
        await deferToThread(wait_until, lambda: counted in self.sandbox.run("status")[0])
        status = self.sandbox.run("status")[0]
        self.assertIn(counted, status)
        # The same figures for scripts.
        out, err, code = self.sandbox.run("status", "--json")
        self.assertEqual(code, 0, err)
        [record] = json.loads(out)["servers"]
        self.assertEqual((record["pid"], record["state"]), (pid, "running"))
        self.assertIn(f'-n "{record["nickname"]}"', status)  # the nickname the line shows
        self.assertEqual(record["counters"], {"requests": 2, "failures": 0, "cache_hits": 1,
                                              "compiling": 0, "waiting": 0})
        self.assertEqual(record["command"], status.splitlines()[0].rsplit(" running as PID", 1)[0])
        for module in client.cwd.glob("*.ko"):
            module.unlink()
        log_so_far = len(self.sandbox.log.read_text())
        # A stop while a compile runs still gives the client its module.
        compile_ = client.stap(f"--use-server=127.0.0.1:{port}", "-r", release, "-p4", "-e",
                               f'probe begin {{ println("{time.time()}"); exit() }}')
        self.assertTrue(await deferToThread(wait_until, lambda: "Options passed from the client"
                                            in self.sandbox.log.read_text()[log_so_far:]))
        out, err, code = self.sandbox.run("stop")
        self.assertEqual(code, 0, err)
        out, err, code = await compile_
        self.assertEqual(code, 0, err.decode())
        self.assertEqual(len([m for m in client.modules() if m.endswith(".ko")]), 1)
        self.assertIn("Waiting for 1 outstanding requests to complete...",
                      self.sandbox.log.read_text())
        self.assertEqual(self.sandbox.pids(), [])


class UserRuleTests(TestCase):
    def launch_as(self, user: str) -> str:
        from stapsrv.cli.arguments import Invocation
        from stapsrv.cli.launch import LaunchFailed
        from stapsrv.cli.manager import Manager
        from stapsrv.config.files import GlobalConfig

        manager = Manager(Invocation("start"), GlobalConfig())
        with self.assertRaises(LaunchFailed) as caught:
            manager._launch(ServerSettings(user=user, log="/nonexistent/dir/log"),
                            Path("/nonexistent/dir/counters"))
        return str(caught.exception)

    def test_group_membership_is_required_when_the_group_exists(self) -> None:
        import grp

        me = test_user()
        self.patch(os, "geteuid", lambda: me.pw_uid)
        group = grp.struct_group(("stap-server", "x", 4242, []))
        self.patch(grp, "getgrnam", lambda name: group)
        self.assertEqual(self.launch_as(me.pw_name),
                         f"user {me.pw_name} is not in group stap-server")

    def test_unknown_user_and_root(self) -> None:
        self.assertEqual(self.launch_as("no-such-user-here"), "there is no user 'no-such-user-here'")
        self.patch(os, "environ", {})
        self.assertIn("servers never run as root", self.launch_as("root"))
