"""Listening on an endpoint description, at once."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure

from stapsrv.config.endpoints import proxied
from stapsrv.reactor import IServerReactor

#: Makes the PROXY protocol endpoint over a stream endpoint.
ProxyWrapper = Callable[[IStreamServerEndpoint], IStreamServerEndpoint]


class NotListening(Exception):
    """An endpoint that could not be listened on (or not at once)."""


def _endpoint(reactor: IServerReactor, description: str, proxy: ProxyWrapper | None,
              gate: ProxyWrapper | None) -> IStreamServerEndpoint:
    def gated(endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
        return endpoint if gate is None else gate(endpoint)

    if proxy is not None and proxied(description):
        stream = description.split(":", 1)[1]
        return proxy(gated(serverFromString(reactor, stream)))  # type: ignore[no-untyped-call]
    endpoint: IStreamServerEndpoint = serverFromString(  # type: ignore[no-untyped-call]
        reactor, description)
    return gated(endpoint)


def listen_now(reactor: IServerReactor, description: str, factory: IProtocolFactory,
               proxy: ProxyWrapper | None = None,
               gate: ProxyWrapper | None = None) -> IListeningPort:
    """Listen on the endpoint ``description`` and return the port.  The
    stream endpoints accepted (:mod:`stapsrv.config.endpoints`) listen at
    once, so the service can start synchronously, as twistd expects.  For
    a ``haproxy:`` description, ``proxy`` (if given) makes the PROXY
    protocol endpoint over the stream endpoint it wraps.  ``gate`` (if
    given) wraps the stream endpoint, under the PROXY reader: it sees each
    accepted socket first (admission, :mod:`stapsrv.app.admission`)."""
    try:
        endpoint = _endpoint(reactor, description, proxy, gate)
    except IndexError as exc:
        raise NotListening(f"Cannot listen on {description}: no such socket was handed "
                           "over (LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise NotListening(f"Cannot listen on {description}: {exc!r}") from exc
    outcome: list[IListeningPort | Failure] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise NotListening(f"Cannot listen on {description}: it does not listen at once")
    result = outcome[0]
    if isinstance(result, Failure):
        if result.check(CannotListenError):
            result.raiseException()
        raise NotListening(f"Cannot listen on {description}: {result.getErrorMessage()}")
    return result
