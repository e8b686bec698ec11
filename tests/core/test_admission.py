"""The admission policy: which connections to close, from counts and ages."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.core.admission import (
    AdmissionPolicy,
    Waiting,
    default_per_peer,
    effective_reserve,
)


class AdmissionPolicyTests(TestCase):
    def test_nothing_closed_while_the_reserve_is_free(self) -> None:
        policy = AdmissionPolicy(limit=1024, reserve=128)
        waiting = [Waiting(n, float(n)) for n in range(800)]
        self.assertEqual(policy.to_close(1024 - 128, waiting), [])

    def test_short_of_the_reserve_the_oldest_go_first(self) -> None:
        policy = AdmissionPolicy(limit=1024, reserve=128)
        waiting = [Waiting(f"c{n}", since) for n, since in
                   enumerate([5.0, 1.0, 9.0, 3.0, 7.0])]
        # 127 free: a batch that frees the reserve again (129 more), and
        # there are only five to close, oldest first.
        self.assertEqual(policy.to_close(1024 - 127, waiting), ["c1", "c3", "c0", "c4", "c2"])

    def test_one_shortage_closes_a_batch(self) -> None:
        policy = AdmissionPolicy(limit=1024, reserve=128)
        waiting = [Waiting(n, float(n)) for n in range(1000)]
        closed = policy.to_close(1024 - 100, waiting)
        self.assertEqual(closed, list(range(156)))  # back to 256 free
        self.assertEqual(policy.to_close(1024 - 100 - 156, waiting[156:]), [])

    def test_new_connections_refused_only_below_the_floor(self) -> None:
        policy = AdmissionPolicy(limit=1024, reserve=128)
        self.assertEqual(policy.floor, 32)
        self.assertTrue(policy.admits(1024 - 32))
        self.assertFalse(policy.admits(1024 - 31))
        self.assertFalse(policy.admits(1024))

    def test_reserve_is_at_most_a_quarter_of_the_limit(self) -> None:
        self.assertEqual(effective_reserve(128, 64), 16)
        self.assertEqual(effective_reserve(128, 65536), 128)
        self.assertEqual(effective_reserve(128, 2), 1)
        policy = AdmissionPolicy(limit=64, reserve=128)
        self.assertEqual((policy.kept_free, policy.floor), (16, 4))

    def test_per_peer_cap(self) -> None:
        self.assertTrue(AdmissionPolicy(limit=1024, per_peer=0).peer_admits(10_000))
        capped = AdmissionPolicy(limit=1024, per_peer=3)
        self.assertTrue(capped.peer_admits(2))
        self.assertFalse(capped.peer_admits(3))

    def test_default_per_peer_is_an_eighth_of_the_limit(self) -> None:
        self.assertEqual(default_per_peer(1024), 128)
        self.assertEqual(default_per_peer(1 << 20), 131072)
        self.assertEqual(default_per_peer(4), 1)
