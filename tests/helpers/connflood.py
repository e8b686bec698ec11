"""A hostile client that holds idle connections to a server (no TLS, no
request), from chosen loopback source addresses, reopening those the
server closes until it is stopped."""

from __future__ import annotations

import resource
import select
import socket
import threading
from collections.abc import Sequence

#: Seconds between two passes over the connections the server closed.
REOPEN_PAUSE = 1.0
#: Passes at most (a bound for the loop; the test stops it long before).
MAX_PASSES = 100_000


def room_for(count: int) -> tuple[int, int]:
    """Let this process hold ``count`` more descriptors (soft limit up to
    the hard one); returns the limit before, for :func:`restore_limit`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = soft + count + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                            hard))
    return soft, hard


def restore_limit(limit: tuple[int, int]) -> None:
    """Put back the descriptor limit :func:`room_for` returned."""
    resource.setrlimit(resource.RLIMIT_NOFILE, limit)


class ConnectionFlood:
    """``count`` connections to ``127.0.0.1:port``, spread over the source
    addresses ``sources``; with ``reopen``, a connection the server closes
    is opened again (every ``REOPEN_PAUSE`` seconds) until :meth:`stop`."""

    def __init__(self, port: int, sources: Sequence[str], count: int,
                 reopen: bool = True) -> None:
        self.port = port
        self.sources = tuple(sources)
        self.count = count
        self.reopen = reopen
        self.sockets: list[socket.socket | None] = [None] * count
        #: Connections opened in all (reopened ones included), and refused
        #: or timed out connects.
        self.opened = 0
        self.failed = 0
        self.first_pass = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="connection-flood",
                                        daemon=True)
        #: This process's descriptor limit before :meth:`start` raised it.
        self._limit: tuple[int, int] | None = None

    def start(self) -> None:
        self._limit = room_for(self.count)
        self._thread.start()

    def hold(self) -> None:
        """Stop reopening (the connections open stay open)."""
        self._stop.set()
        self._thread.join(60)

    def stop(self) -> None:
        """Stop reopening, close every connection, and put this process's
        descriptor limit back."""
        self.hold()
        for index, sock in enumerate(self.sockets):
            if sock is not None:
                sock.close()
                self.sockets[index] = None
        if self._limit is not None:
            restore_limit(self._limit)
            self._limit = None

    def held(self) -> int:
        """Connections open now that the server has not closed."""
        return sum(1 for sock in self.sockets if sock is not None and not _closed(sock))

    def _connect(self, index: int) -> None:
        source = self.sources[index % len(self.sources)]
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                            source_address=(source, 0))
        except OSError:
            self.failed += 1
            return
        self.opened += 1
        self.sockets[index] = sock

    def _run(self) -> None:
        for index in range(self.count):
            if self._stop.is_set():
                break
            self._connect(index)
        self.first_pass.set()
        for _ in range(MAX_PASSES):
            if not self.reopen or self._stop.wait(REOPEN_PAUSE):
                return
            for index, sock in enumerate(self.sockets):
                if self._stop.is_set():
                    return
                if sock is None or _closed(sock):
                    if sock is not None:
                        sock.close()
                        self.sockets[index] = None
                    self._connect(index)


def _closed(sock: socket.socket) -> bool:
    """The server closed (or reset) ``sock``: it reads as the end (or the
    flood's thread has closed it meanwhile)."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    except ValueError:  # closed by the other thread: fileno() is -1
        return True
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
