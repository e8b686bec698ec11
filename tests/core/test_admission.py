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

    def test_default_per_peer_is_an_eighth_of_the_limit_at_most_1024(self) -> None:
        self.assertEqual(default_per_peer(1024), 128)
        self.assertEqual(default_per_peer(8192), 1024)
        self.assertEqual(default_per_peer(1 << 20), 1024)
        self.assertEqual(default_per_peer(4), 1)

    def test_connections_within_their_grace_are_never_closed(self) -> None:
        policy = AdmissionPolicy(limit=1024, reserve=128)
        # Short, with fewer waiting than wanted: only those past their
        # grace go, not the one just accepted.
        waiting = [Waiting("old", 1.0), Waiting("young", 9.0), Waiting("new", 10.0)]
        self.assertEqual(policy.to_close(1024 - 100, waiting, now=10.0, grace=2.0), ["old"])
        self.assertEqual(policy.to_close(1024 - 100, waiting[1:], now=10.0, grace=2.0), [])

    def test_ranked_by_accept_not_by_last_byte(self) -> None:
        # A dripping client accepted first goes before an honest one
        # accepted later (Waiting holds accept times, not last bytes).
        policy = AdmissionPolicy(limit=1024, reserve=4)  # 3 free: 5 go
        waiting = [Waiting(f"honest{n}", 2.0 + n, f"192.0.2.{n}") for n in range(5)]
        waiting.append(Waiting("drip", 1.0, "192.0.2.9"))
        self.assertEqual(policy.to_close(1024 - 3, waiting, now=10.0, grace=2.0),
                         ["drip", "honest0", "honest1", "honest2", "honest3"])

    def test_the_busiest_peers_first(self) -> None:
        policy = AdmissionPolicy(limit=1024, reserve=4)  # 3 free: 5 go
        waiting = ([Waiting(f"honest{n}", float(n), f"192.0.2.{n}") for n in range(5)]
                   + [Waiting(f"flood{n}", 3.0 + n, "203.0.113.9") for n in range(6)])
        self.assertEqual(policy.to_close(1024 - 3, waiting, now=100.0, grace=2.0),
                         [f"flood{n}" for n in range(5)])
