"""Listening on an endpoint description, at once."""

from __future__ import annotations

from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.python.failure import Failure

from stapsrv.reactor import IServerReactor


class NotListening(Exception):
    """An endpoint that could not be listened on (or not at once)."""


def listen_now(reactor: IServerReactor, description: str,
               factory: IProtocolFactory) -> IListeningPort:
    """Listen on the endpoint ``description`` and return the port.  The
    stream endpoints accepted (:mod:`stapsrv.config.endpoints`) listen at
    once, so the service can start synchronously, as twistd expects."""
    try:
        endpoint = serverFromString(reactor, description)  # type: ignore[no-untyped-call]
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
