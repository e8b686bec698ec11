from __future__ import annotations

from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from stapsrv.app.health import Health, listening_check
from stapsrv.app.metrics import HealthPage, MetricsPage, ServerMetrics
from stapsrv.kernel.prepared import Preparation
from stapsrv.vm.verification import ProbeResult, Verification


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


class MetricsTests(TestCase):
    def setUp(self) -> None:
        self.open = 3
        self.metrics = ServerMetrics(connections=lambda: self.open, compiling=lambda: 1,
                                     waiting=lambda: 2, process=False)

    def test_outcomes_latencies_tiers_and_translators(self) -> None:
        m = self.metrics
        m.request_done("cached", 0.004)
        m.cache_hit("disk")
        m.request_done("cached", 0.02)
        m.cache_hit("fleet")
        m.request_done("compiled", 12.0)
        m.translator_done(11.5, 0)
        m.translator_done(3.0, 1)
        m.translator_done(900.0, None)
        m.request_done("refused", 0.001)
        self.assertEqual(sample(m, "stapsrv_requests_total", outcome="cached"), 2)
        self.assertEqual(sample(m, "stapsrv_requests_total", outcome="compiled"), 1)
        self.assertEqual(sample(m, "stapsrv_requests_total", outcome="refused"), 1)
        self.assertEqual(sample(m, "stapsrv_requests_total", outcome="failed"), 0)
        self.assertEqual(sample(m, "stapsrv_cache_hits_total", tier="disk"), 1)
        self.assertEqual(sample(m, "stapsrv_cache_hits_total", tier="fleet"), 1)
        self.assertEqual(sample(m, "stapsrv_cache_hits_total", tier="inflight"), 0)
        self.assertEqual(sample(m, "stapsrv_request_duration_seconds_bucket", answer="cached",
                                le="0.005"), 1)
        self.assertEqual(sample(m, "stapsrv_request_duration_seconds_count", answer="cached"), 2)
        self.assertEqual(sample(m, "stapsrv_compile_request_duration_seconds_sum"), 12.0)
        self.assertEqual(sample(m, "stapsrv_translator_runs_total", result="ok"), 1)
        self.assertEqual(sample(m, "stapsrv_translator_runs_total", result="error"), 1)
        self.assertEqual(sample(m, "stapsrv_translator_runs_total", result="stopped"), 1)
        self.assertEqual(sample(m, "stapsrv_translator_duration_seconds_count"), 3)

    def test_gauges_are_read_when_scraped(self) -> None:
        self.assertEqual(sample(self.metrics, "stapsrv_connections_open"), 3)
        self.open = 7
        self.assertEqual(sample(self.metrics, "stapsrv_connections_open"), 7)
        self.assertEqual(sample(self.metrics, "stapsrv_compiles_in_flight"), 1)
        self.assertEqual(sample(self.metrics, "stapsrv_compiles_waiting"), 2)

    def test_connections_closed_early_by_reason(self) -> None:
        for reason in ("oldest", "full", "peer"):
            self.assertEqual(sample(self.metrics, "stapsrv_connections_closed_early_total",
                                    reason=reason), 0)
        self.metrics.closed_early("peer")
        self.metrics.closed_early("peer")
        self.metrics.closed_early("oldest")
        self.assertEqual(sample(self.metrics, "stapsrv_connections_closed_early_total",
                                reason="peer"), 2)
        self.assertEqual(sample(self.metrics, "stapsrv_connections_closed_early_total",
                                reason="oldest"), 1)

    def test_verifications_are_read_when_scraped(self) -> None:
        found: list[Verification] = []
        metrics = ServerMetrics(connections=lambda: 0, compiling=lambda: 0, waiting=lambda: 0,
                                process=False, verifications=lambda: found)
        self.assertIsNone(sample(metrics, "stapsrv_kernel_verification_passed",
                                 release="6.1.0-57-amd64"))
        found.append(Verification("6.1.0-57-amd64", 1700000000.0, "stap 4.8", (
            ProbeResult("4.8", "kprobe", True), ProbeResult("5.5", "kprobe", False, "x"))))
        self.assertEqual(sample(metrics, "stapsrv_kernel_verification_runs",
                                release="6.1.0-57-amd64", client="4.8", probe="kprobe"), 1)
        self.assertEqual(sample(metrics, "stapsrv_kernel_verification_runs",
                                release="6.1.0-57-amd64", client="5.5", probe="kprobe"), 0)
        self.assertEqual(sample(metrics, "stapsrv_kernel_verification_passed",
                                release="6.1.0-57-amd64"), 0)
        self.assertEqual(sample(metrics, "stapsrv_kernel_verification_timestamp_seconds",
                                release="6.1.0-57-amd64"), 1700000000.0)

    def test_preparations_are_read_when_scraped(self) -> None:
        found: list[Preparation] = []
        metrics = ServerMetrics(connections=lambda: 0, compiling=lambda: 0, waiting=lambda: 0,
                                process=False, preparations=lambda: found)
        found += [Preparation("6.1.0-58-amd64", 1000.0, (("fetch", 7.0), ("stapconf", 20.0)),
                              1040.0, by="host-a"),
                  Preparation("6.1.0-59-amd64", 1000.0, failure="no room", by="host-a")]
        self.assertEqual(sample(metrics, "stapsrv_release_prepared_ready",
                                release="6.1.0-58-amd64", by="host-a"), 1)
        self.assertEqual(sample(metrics, "stapsrv_release_prepared_ready",
                                release="6.1.0-59-amd64", by="host-a"), 0)
        self.assertEqual(sample(metrics, "stapsrv_release_appearance_to_ready_seconds",
                                release="6.1.0-58-amd64"), 40.0)
        self.assertEqual(sample(metrics, "stapsrv_release_preparation_seconds",
                                release="6.1.0-58-amd64", step="stapconf"), 20.0)
        metrics.preparation_step("stapconf tc48", 19.0)
        self.assertEqual(sample(metrics, "stapsrv_release_preparation_step_seconds_count",
                                step="stapconf"), 1)

    def test_registries_are_per_server(self) -> None:
        other = ServerMetrics(connections=lambda: 0, compiling=lambda: 0, waiting=lambda: 0,
                              process=False)
        self.metrics.request_done("compiled", 1.0)
        self.assertEqual(sample(other, "stapsrv_requests_total", outcome="compiled"), 0)

    def test_metrics_page_is_the_text_exposition(self) -> None:
        request = DummyRequest([b""])
        body = MetricsPage(self.metrics).render_GET(request)  # type: ignore[arg-type]
        self.assertIn(b'stapsrv_requests_total{outcome="cached"} 0.0', body)
        self.assertIn(b"# TYPE stapsrv_connections_open gauge", body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain"))

    def test_health_page_codes(self) -> None:
        healthy = Health((listening_check(True, "here"),))
        request = DummyRequest([b""])
        body = HealthPage(lambda: healthy).render_GET(request)  # type: ignore[arg-type]
        self.assertEqual((request.responseCode or 200, body.splitlines()[0]), (200, b"ok"))
        sick = Health((listening_check(False, "here"),))
        request = DummyRequest([b""])
        body = HealthPage(lambda: sick).render_GET(request)  # type: ignore[arg-type]
        self.assertEqual((request.responseCode, body.splitlines()[0]), (503, b"unhealthy"))
