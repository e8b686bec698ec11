"""A real Prometheus server on loopback, with its own scrape configuration
and TSDB directory, queried through its HTTP API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import require_program
from tests.helpers.realredis import free_port


def scrape_config(targets: Sequence[str], interval: str = "1s") -> str:
    quoted = ", ".join(f"'{target}'" for target in targets)
    return (f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            f"scrape_configs:\n  - job_name: stapsrv\n    static_configs:\n"
            f"      - targets: [{quoted}]\n")


class Prometheus:
    def __init__(self, directory: Path, targets: Sequence[str]) -> None:
        self.program = require_program("prometheus")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(scrape_config(targets))
        self.log_path = directory / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.program, f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={self.directory / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=str(self.directory))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError("prometheus did not start:\n" + self.log_path.read_text())

    def query(self, promql: str) -> list[dict[str, object]]:
        """The result vector of an instant query."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body}")
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single value of a query (None: no series yet)."""
        result = self.query(promql)
        if not result:
            return None
        sample = result[0]["value"]
        assert isinstance(sample, list)
        return float(sample[1])

    def wait_for_value(self, promql: str, wanted: float, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.value(promql)
            if last == wanted:
                return last
            time.sleep(0.5)
        raise AssertionError(f"{promql} is {last}, not {wanted}, after {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_prometheus(test: object, directory: Path, targets: Sequence[str]) -> Prometheus:
    prometheus = Prometheus(directory, targets)
    test.addCleanup(prometheus.stop)  # type: ignore[attr-defined]
    return prometheus.start()
