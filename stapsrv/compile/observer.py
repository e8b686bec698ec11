"""What the request handler reports as it works, for whoever measures it
(the Prometheus metrics); by default nobody."""

from __future__ import annotations

from typing import Protocol

#: The outcomes of a request: answered from a cache, compiled, refused by
#: the server's checks or policy (the client is told why), or failed.
OUTCOMES = ("cached", "compiled", "refused", "failed")


class RequestObserver(Protocol):
    def request_done(self, outcome: str, seconds: float) -> None:
        """A request ended with ``outcome`` (one of :data:`OUTCOMES`)
        ``seconds`` after it was read."""

    def cache_hit(self, tier: str) -> None:
        """A request was answered from the cache ``tier`` (``disk``,
        ``fleet``, or ``inflight``: the compile of an identical request)."""

    def translator_done(self, seconds: float, exit_status: int | None) -> None:
        """A translator run ended (``None``: it was stopped or lost)."""


class NoObserver:
    def request_done(self, outcome: str, seconds: float) -> None:
        pass

    def cache_hit(self, tier: str) -> None:
        pass

    def translator_done(self, seconds: float, exit_status: int | None) -> None:
        pass
