"""One request's link back to its connection while the pipeline works for
it: the handler, the releases it builds for and the warm-up all read it,
and none of them owns it."""

from __future__ import annotations

from attrs import define, field

from stapsrv.compile.translator import TranslatorRun
from stapsrv.core.budget import Work, peer_address
from stapsrv.kernel.store import Lease
from stapsrv.kernel.toolchains import Toolchain


@define(eq=False)
class RequestContext:
    """One request's link back to its connection, and the translator that
    runs for it (while one does)."""

    peer: str
    abandoned: bool = False
    timed_out: bool = False
    translator: TranslatorRun | None = None
    #: The translator's output streams (1, 2) cut at ``--max-output``.
    cut_output: tuple[int, ...] = ()
    #: The kernel store work this request counts as for its address's
    #: share (``--peer-fetches``), until it is answered.
    store_work: Work | None = None
    #: The request is answered: kernel store work still running for it
    #: (its symbols) no longer counts against its address.
    answered: bool = False
    #: ``Server:`` lines for the client's stderr (work not done for it).
    notes: list[str] = field(factory=list)
    #: The kernel store's releases the request reads, held until it is
    #: answered (the size cap and removal pass them by).
    lease: Lease | None = None
    #: The toolchain that answers it, once chosen (None: the host's).
    toolchain: Toolchain | None = None

    @property
    def address(self) -> str:
        """The client's address (its share of slots and kernel store work
        is per address, not per connection)."""
        return peer_address(self.peer)

    def abandon(self) -> None:
        """The client went away: stop any compile now."""
        self.abandoned = True
        self.stop_translator()

    def stop_translator(self) -> None:
        if self.translator is not None:
            self.translator.kill()
