"""A protocol factory that decides, connection by connection, whether the
factory it wraps builds a protocol (None: the listening port closes the
socket at once, before anything is read); the rest of the factory's life
is the wrapped one's."""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, ILoggingContext, IProtocol, IProtocolFactory
from zope.interface import implementer


@implementer(IProtocolFactory, ILoggingContext)
class GateFactory:
    """Subclasses say in :meth:`buildProtocol` which connections get one."""

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self.wrapped = wrapped

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        return self.wrapped.buildProtocol(addr)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def logPrefix(self) -> str:
        if ILoggingContext.providedBy(self.wrapped):
            return str(self.wrapped.logPrefix())
        return self.wrapped.__class__.__name__
