"""What one client address may make others wait for (stapsrv.core.budget):
slots in turn by address, and the kernel store work per address."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from stapsrv.core.budget import (
    SERVER,
    FairSlots,
    PeerBudget,
    over_budget_message,
    peer_address,
    share_key,
)


class AddressTests(TestCase):
    def test_the_port_is_left_out(self) -> None:
        self.assertEqual(peer_address("10.0.0.1:40000"), "10.0.0.1")
        self.assertEqual(peer_address("[2001:db8::1]:40000"), "2001:db8::/64")
        for odd in ("peer", "2001:db8::1", "[unclosed", "host:port"):
            self.assertEqual(peer_address(odd), odd)

    def test_an_ipv6_host_counts_with_its_whole_64(self) -> None:
        # Any of the 2^64 source addresses of one host is the same client.
        self.assertEqual(share_key("2001:db8:1:2::1"), "2001:db8:1:2::/64")
        self.assertEqual(share_key("2001:db8:1:2:ffff:1:2:3"), "2001:db8:1:2::/64")
        self.assertNotEqual(share_key("2001:db8:1:3::1"), share_key("2001:db8:1:2::1"))
        # Link-local: every link is fe80::/64, so the address itself counts.
        self.assertEqual(share_key("fe80::1%eth0"), "fe80::1%eth0")
        self.assertNotEqual(share_key("fe80::2%eth0"), share_key("fe80::1%eth0"))
        # IPv4, also through an IPv6 socket, is the address itself.
        self.assertEqual(share_key("192.0.2.7"), "192.0.2.7")
        self.assertEqual(share_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(share_key("not an address"), "not an address")


class FairSlotsTests(TestCase):
    def test_free_slots_are_taken_at_once(self) -> None:
        slots: FairSlots[str] = FairSlots(2)
        self.assertTrue(slots.request("a", "a1"))
        self.assertTrue(slots.request("a", "a2"))
        self.assertFalse(slots.request("a", "a3"))
        self.assertEqual((slots.free, len(slots), dict(slots.held)), (0, 1, {"a": 2}))

    def test_a_single_request_is_not_pushed_behind_many(self) -> None:
        slots: FairSlots[str] = FairSlots(1)
        self.assertTrue(slots.request("a", "a0"))
        for n in range(1, 6):
            slots.request("a", f"a{n}")
        slots.request("b", "b1")
        granted = []
        key = "a"
        while (turn := slots.release(key)) is not None:
            key, item = turn
            granted.append(item)
        # b's one request comes right after a's first, not after all five.
        self.assertEqual(granted, ["a1", "b1", "a2", "a3", "a4", "a5"])
        self.assertEqual((slots.free, len(slots)), (1, 0))

    def test_the_address_holding_fewest_slots_goes_first(self) -> None:
        slots: FairSlots[str] = FairSlots(3)
        for item in ("a1", "a2", "b1"):
            self.assertTrue(slots.request(item[0], item))
        slots.request("a", "a3")
        slots.request("b", "b2")
        slots.request("c", "c1")
        # a holds one then, b one, c none: c first.
        self.assertEqual(slots.release("a"), ("c", "c1"))
        # a holds none, b one: a.
        self.assertEqual(slots.release("a"), ("a", "a3"))
        self.assertEqual(slots.release("c"), ("b", "b2"))
        self.assertEqual(dict(slots.held), {"b": 2, "a": 1})

    def test_a_withdrawn_waiter_never_gets_a_slot(self) -> None:
        slots: FairSlots[str] = FairSlots(1)
        slots.request("a", "a1")
        slots.request("b", "b1")
        slots.request("c", "c1")
        self.assertTrue(slots.withdraw("b1"))
        self.assertFalse(slots.withdraw("b1"))
        self.assertEqual(slots.release("a"), ("c", "c1"))
        self.assertIsNone(slots.release("c"))

    def test_releasing_a_slot_not_held_is_an_error(self) -> None:
        slots: FairSlots[str] = FairSlots(1)
        self.assertRaises(ValueError, slots.release, "a")
        self.assertRaises(ValueError, FairSlots, 0)


class BudgetTests(TestCase):
    def test_an_address_has_its_share_and_no_more(self) -> None:
        budget = PeerBudget(1)
        first = budget.start("10.0.0.1", "x", "the fetch of kernel release 'x'")
        assert first is not None
        self.assertIsNone(budget.start("10.0.0.1", "y", "the fetch of kernel release 'y'"))
        self.assertIsNotNone(budget.start("10.0.0.2", "y", "the fetch of kernel release 'y'"),
                             "another address has its own")
        self.assertIsNotNone(budget.start(SERVER, "z", "warm-up"), "the server's own work")
        self.assertEqual(budget.under_way("10.0.0.1"), [first])
        budget.finish(first)
        self.assertIsNotNone(budget.start("10.0.0.1", "y", "the fetch of kernel release 'y'"))

    def test_more_work_for_the_same_release_costs_nothing_more(self) -> None:
        budget = PeerBudget(1)
        fetch = budget.start("10.0.0.1", "x", "the fetch of kernel release 'x'")
        symbols = budget.start("10.0.0.1", "x", "the System.map of kernel release 'x'")
        assert fetch is not None and symbols is not None
        self.assertIsNone(budget.start("10.0.0.1", "y", "the fetch of kernel release 'y'"))
        budget.finish(fetch)
        self.assertIsNone(budget.start("10.0.0.1", "y", "the fetch of kernel release 'y'"))
        budget.finish(symbols)
        self.assertIsNotNone(budget.start("10.0.0.1", "y", "the fetch of kernel release 'y'"))
        two = PeerBudget(2)
        self.assertTrue(all(two.start("a", release, "w") is not None
                            for release in ("x", "y", "x", "y")))
        self.assertIsNone(two.start("a", "z", "w"))

    def test_zero_is_no_cap(self) -> None:
        budget = PeerBudget(0)
        self.assertTrue(all(budget.start("a", str(n), str(n)) is not None for n in range(10)))

    def test_the_message_says_what_was_asked_what_is_allowed_and_when(self) -> None:
        budget = PeerBudget(1)
        budget.start("10.0.0.1", "6.1.0-3-amd64", "the fetch of kernel release '6.1.0-3-amd64'")
        self.assertEqual(
            over_budget_message("the fetch of kernel release '6.1.0-7-amd64'", "10.0.0.1", 1,
                                budget.under_way("10.0.0.1")),
            "Server: Not starting the fetch of kernel release '6.1.0-7-amd64' for 10.0.0.1 "
            "now: this server does kernel store work (fetching a release, its symbols or "
            "debuginfo, its modules' debuginfo, a warm-up compile) for at most one kernel "
            "release at a time for one "
            "client address (--peer-fetches), and 10.0.0.1 has the fetch of kernel release "
            "'6.1.0-3-amd64' under way.  Try again once that is done.")
