"""Translator slots taken in turn by client address (stapsrv.compile.slots)."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import TestCase

from stapsrv.compile.slots import FairGate


class FairGateTests(TestCase):
    def test_a_single_request_is_not_pushed_behind_many(self) -> None:
        gate = FairGate(1)
        order: list[str] = []
        gate.acquire_for("a").addCallback(lambda _: order.append("a0"))
        for n in range(1, 4):
            gate.acquire_for("a").addCallback(lambda _, n=n: order.append(f"a{n}"))
        gate.acquire_for("b").addCallback(lambda _: order.append("b1"))
        self.assertEqual((order, len(gate.waiting), gate.tokens), (["a0"], 4, 0))
        gate.release_for("a")
        gate.release_for("a")
        self.assertEqual(order, ["a0", "a1", "b1"])
        self.assertEqual(len(gate.waiting), 2)
        for key in ("b", "a"):
            gate.release_for(key)
        self.assertEqual(order, ["a0", "a1", "b1", "a2", "a3"])
        gate.release_for("a")
        self.assertEqual((len(gate.waiting), gate.tokens), (0, 1))

    def test_a_cancelled_wait_gives_up_its_turn(self) -> None:
        gate = FairGate(1)
        gate.acquire()
        waiter = gate.acquire_for("b")
        failures: list[object] = []
        waiter.addErrback(lambda failure: failures.append(failure.trap(CancelledError)))
        waiter.cancel()
        self.assertEqual((len(gate.waiting), len(failures)), (0, 1))
        gate.release()
        self.assertEqual(gate.tokens, 1)


class ReleaseChainTests(TestCase):
    def test_a_long_queue_of_waiters_that_give_back_at_once_loses_no_slot(self) -> None:
        """3000 requests whose clients left: each takes its turn and gives
        the slot straight back (the handler does); the gate ends as it
        began, every waiter served."""
        gate = FairGate(1)
        first = gate.acquire_for("a")
        self.assertTrue(first.called)
        served = []
        for index in range(3000):
            waiter = gate.acquire_for(f"peer{index % 7}")

            def gone(_: object, index: int = index) -> None:
                served.append(index)
                gate.release_for(f"peer{index % 7}")

            waiter.addCallback(gone)
        gate.release_for("a")
        self.assertEqual(len(served), 3000)
        self.assertEqual((gate.tokens, len(gate.waiting)), (1, 0))
