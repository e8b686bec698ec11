"""Interfaces between the compile server and its optional collaborators."""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@frozen
class ServiceRecord:
    """One advertised service: its (initial) name, port and TXT strings."""

    name: str
    port: int
    txt: tuple[bytes, ...]


class IServicePublisher(Interface):
    """Advertises a compile server's services on the local network (mDNS)."""

    published = Attribute("The service names currently advertised (a tuple, maybe empty).")

    def publish(records: Sequence[ServiceRecord]) -> None:
        """Start advertising ``records`` (a sequence of ``ServiceRecord``)
        and keep them advertised until :meth:`withdraw`: rename them on name
        collisions and advertise them again when the mDNS daemon comes
        (back).  Never raises because the daemon or the bus is missing: that
        is logged once and publishing happens when they appear."""

    def update(records: Sequence[ServiceRecord]) -> None:
        """Advertise ``records`` in place of those given before (the server
        serves another release now); nothing when not publishing."""

    def withdraw() -> Deferred[None]:
        """Stop advertising and release every resource.  Returns a
        ``Deferred`` that fires when done; never fails."""
