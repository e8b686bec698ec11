"""Prometheus metrics of one compile server, and the HTTP listener that
serves them (``/metrics``) with the health check (``/healthz``).

Each server has its own registry (a process may run several servers).
Request outcomes, cache hits and translator runs are counted as the
handler reports them; the gauges are read from the server when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from stapsrv.app.health import Health
from stapsrv.app.listen import listen_now
from stapsrv.compile.observer import OUTCOMES
from stapsrv.reactor import IServerReactor
from stapsrv.kernel.prepared import Preparation
from stapsrv.vm.verification import Verification

#: Latency buckets, in seconds: cached answers take milliseconds, compiles
#: of new scripts tens of seconds to minutes.
CACHED_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMPILE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0)
TIERS = ("disk", "fleet", "inflight")
#: Buckets of a release's preparation steps, in seconds.
PREPARE_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
#: Why admission closed a connection (:mod:`stapsrv.app.admission`).
CLOSED_EARLY = ("oldest", "full", "peer")


class ServerMetrics:
    """The metrics, and the handler's observer that feeds them."""

    def __init__(self, connections: Callable[[], int], compiling: Callable[[], int],
                 waiting: Callable[[], int], process: bool = True,
                 verifications: Callable[[], Sequence[Verification]] = list,
                 preparations: Callable[[], Sequence[Preparation]] = list) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(VerificationCollector(verifications))
        r.register(PreparationCollector(preparations))
        self.preparation_steps = Histogram(
            "stapsrv_release_preparation_step_seconds", "Seconds each step of preparing a "
            "new release took (fetch, symbols, stapconf, verify), and appearance_to_ready: "
            "from its appearance in the suites' lists to ready (--prepare-releases).",
            ["step"], buckets=PREPARE_BUCKETS, registry=r)
        self.requests = Counter("stapsrv_requests", "Requests read, by outcome "
                                "(cached, compiled, refused, failed).", ["outcome"], registry=r)
        self.duration = Histogram("stapsrv_request_duration_seconds", "Seconds from a "
                                  "request read to its answer, for cached answers.",
                                  ["answer"], buckets=CACHED_BUCKETS, registry=r)
        self.compile_duration = Histogram(
            "stapsrv_compile_request_duration_seconds", "Seconds from a request read to "
            "its answer, for compiled answers.", buckets=COMPILE_BUCKETS, registry=r)
        self.cache_hits = Counter("stapsrv_cache_hits", "Requests answered from a cache, "
                                  "by tier (disk, fleet, inflight).", ["tier"], registry=r)
        self.translator_runs = Counter("stapsrv_translator_runs", "Translator runs ended, "
                                       "by result (ok, error, stopped).", ["result"],
                                       registry=r)
        self.translator_seconds = Histogram("stapsrv_translator_duration_seconds",
                                            "Seconds each translator run took.",
                                            buckets=COMPILE_BUCKETS, registry=r)
        self.untrusted_proxies = Counter(
            "stapsrv_untrusted_proxy_connections", "Connections to a haproxy: endpoint "
            "closed unread: their peer is not in --proxy-from.", registry=r)
        self.closed_early_total = Counter(
            "stapsrv_connections_closed_early", "Connections closed to keep room for new "
            "clients, by reason: oldest (waited longest without a request while "
            "descriptors ran short), full (new, with no descriptor to spare), peer (over "
            "the per-peer cap).", ["reason"], registry=r)
        Gauge("stapsrv_compiles_in_flight", "Translators running now.",
              registry=r).set_function(compiling)
        Gauge("stapsrv_compiles_waiting", "Requests waiting for a translator slot.",
              registry=r).set_function(waiting)
        Gauge("stapsrv_connections_open", "Client connections open now.",
              registry=r).set_function(connections)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for tier in TIERS:
            self.cache_hits.labels(tier)
        for reason in CLOSED_EARLY:
            self.closed_early_total.labels(reason)
        for result in ("ok", "error", "stopped"):
            self.translator_runs.labels(result)
        self.duration.labels("cached")
        if process:
            # Resident memory, descriptors, CPU of this process.
            ProcessCollector(registry=r)

    # RequestObserver
    def request_done(self, outcome: str, seconds: float) -> None:
        self.requests.labels(outcome).inc()
        if outcome == "cached":
            self.duration.labels("cached").observe(seconds)
        elif outcome == "compiled":
            self.compile_duration.observe(seconds)

    def cache_hit(self, tier: str) -> None:
        self.cache_hits.labels(tier).inc()

    def translator_done(self, seconds: float, exit_status: int | None) -> None:
        result = "stopped" if exit_status is None else "ok" if exit_status == 0 else "error"
        self.translator_runs.labels(result).inc()
        self.translator_seconds.observe(seconds)

    def preparation_step(self, step: str, seconds: float) -> None:
        self.preparation_steps.labels(step.split(" ")[0]).observe(seconds)

    def closed_early(self, reason: str) -> None:
        self.closed_early_total.labels(reason).inc()

    def untrusted_proxy(self) -> None:
        self.untrusted_proxies.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class PreparationCollector(Collector):
    """The releases prepared before clients asked (``--prepare-releases``),
    read from the store's records when scraped."""

    def __init__(self, preparations: Callable[[], Sequence[Preparation]]) -> None:
        self.preparations = preparations

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "stapsrv_release_prepared_ready", "1 when a release that appeared in the suites' "
            "lists was made ready before any client asked; 0 while it is prepared, or when "
            "that failed.", labels=["release", "by"])
        to_ready = GaugeMetricFamily(
            "stapsrv_release_appearance_to_ready_seconds", "Seconds from a release's "
            "appearance in the suites' lists to ready.", labels=["release"])
        steps = GaugeMetricFamily(
            "stapsrv_release_preparation_seconds", "Seconds each step of a release's "
            "preparation took.", labels=["release", "step"])
        for found in self.preparations():
            ready.add_metric([found.release, found.by], 1.0 if found.ready is not None else 0.0)
            if found.to_ready is not None:
                to_ready.add_metric([found.release], found.to_ready)
            for name, seconds in found.steps:
                steps.add_metric([found.release, name], seconds)
        yield ready
        yield to_ready
        yield steps


class VerificationCollector(Collector):
    """What ``kernels verify`` found for the releases of the server's store,
    read when scraped: per release, client and probe kind whether the
    module runs, and per release whether all do and when that was found."""

    def __init__(self, verifications: Callable[[], Sequence[Verification]]) -> None:
        self.verifications = verifications

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily(
            "stapsrv_kernel_verification_runs", "1 when the module of a probe kind, built "
            "for the release by this server's translator, runs on the release's kernel in a "
            "VM with the client's staprun (kernels verify); 0 when it fails.",
            labels=["release", "client", "probe"])
        passed = GaugeMetricFamily(
            "stapsrv_kernel_verification_passed", "1 when every verified module of the "
            "release runs.", labels=["release"])
        when = GaugeMetricFamily(
            "stapsrv_kernel_verification_timestamp_seconds", "When the release was last "
            "verified.", labels=["release"])
        for found in self.verifications():
            for result in found.results:
                runs.add_metric([found.release, result.client, result.probe],
                                1.0 if result.runs else 0.0)
            passed.add_metric([found.release], 1.0 if found.passed else 0.0)
            when.add_metric([found.release], found.when)
        yield runs
        yield passed
        yield when


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: ServerMetrics) -> None:
        Resource.__init__(self)
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self.metrics.exposition()


class HealthPage(Resource):
    """200 and ``ok`` when the server can serve, else 503 and the reasons."""

    isLeaf = True

    def __init__(self, health: Callable[[], Health]) -> None:
        Resource.__init__(self)
        self.health = health

    def render_GET(self, request: Request) -> bytes:
        health = self.health()
        request.setResponseCode(200 if health.ok else 503)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return health.text().encode()


def metrics_site(metrics: ServerMetrics, health: Callable[[], Health]) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics))
    root.putChild(b"healthz", HealthPage(health))
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


class MetricsService(Service):
    """Listens on the ``--metrics`` endpoint while the server runs."""

    def __init__(self, description: str, site: Callable[[], Site], reactor: IServerReactor,
                 log: Logger) -> None:
        self.description = description
        self.site = site
        self.reactor = reactor
        self.log = log
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        self.port = listen_now(self.reactor, self.description, self.site())
        address = self.port.getHost()
        self.log.info("Serving metrics and health at http://[{address}]:{port}/metrics "
                      "and /healthz", address=getattr(address, "host", "?"),
                      port=getattr(address, "port", "?"))
        Service.startService(self)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            stopped: Deferred[None] | None = port.stopListening()
            return stopped
        return None
