"""A TCP server that runs each connection on its own, tracked thread.

Used by the public HTTP/1.1 server (:mod:`rhttp_wsgi.public`) and the proxy's
tunnel listener (:mod:`rhttp_wsgi.proxy`).  Unlike ``socketserver.ThreadingMixIn``
it caps the connections (answering the overflow through a callback), joins its
threads with a deadline and stops accepting without racing ``serve_forever``.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ThreadedTCPServer"]

log = logging.getLogger("rhttp_wsgi.server")


class ThreadedTCPServer(socketserver.TCPServer):
    """``socketserver.TCPServer`` with one tracked thread per connection.

    ``handler(sock, addr)`` runs on the connection thread; the socket is
    closed when it returns.  At ``max_connections`` open connections (0: no
    cap) a new one is handed to ``on_overload`` and closed.  :meth:`join_threads`
    waits for the connection threads with a deadline.
    """

    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int] | None,
        handler: Callable[[socket.socket, Any], None],
        *,
        name: str,
        sock: socket.socket | None = None,
        max_connections: int = 0,
        on_overload: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self._handler = handler
        self.name = name
        self._tlock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._count = 0
        self._max_connections = max_connections
        self._on_overload = on_overload
        self._closed = False
        self.serving = False
        if sock is not None:
            self.address_family = sock.family
            super().__init__(sock.getsockname(), socketserver.BaseRequestHandler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        else:
            assert address is not None
            host = address[0]
            self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            super().__init__(address, socketserver.BaseRequestHandler, bind_and_activate=True)

    @property
    def bound(self) -> tuple[str, int]:
        addr = self.server_address
        return str(addr[0]), int(addr[1])

    def process_request(self, request: Any, client_address: Any) -> None:  # listener thread
        with self._tlock:
            if self._closed:
                self.shutdown_request(request)
                return
            overloaded = 0 < self._max_connections <= len(self._threads)
            self._count += 1
            if not overloaded:
                t = threading.Thread(target=self._run, args=(request, client_address),
                                     name=f"{self.name}-{self._count}", daemon=True)
                self._threads.add(t)
        if overloaded:
            log.warning("%s: %d connections open; refusing %s", self.name, self._max_connections,
                        client_address)
            if self._on_overload is not None:
                try:
                    self._on_overload(request)
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            t.start()
        except RuntimeError:
            log.error("%s: cannot start a thread for %s", self.name, client_address)
            with self._tlock:
                self._threads.discard(t)
            self.shutdown_request(request)

    def _run(self, request: socket.socket, client_address: Any) -> None:  # connection thread
        try:
            self._handler(request, client_address)
        except Exception:
            log.exception("%s: connection from %s failed", self.name, client_address)
        finally:
            self.shutdown_request(request)
            with self._tlock:
                self._threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("%s: error accepting %s", self.name, client_address)

    def stop_accepting(self) -> None:
        """Stop the accept loop (if running) and close the listening socket."""
        with self._tlock:
            self._closed = True
            serving = self.serving
        if serving:
            self.shutdown()
        self.server_close()

    def server_close(self) -> None:
        try:
            self.socket.close()
        except OSError:  # pragma: no cover
            pass

    def serve(self, poll_interval: float = 0.05) -> None:
        """``serve_forever`` unless already stopped (then return at once)."""
        with self._tlock:
            if self._closed:
                return
            self.serving = True
        self.serve_forever(poll_interval)

    def threads(self) -> list[threading.Thread]:
        with self._tlock:
            return list(self._threads)

    def join_threads(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(remaining)
        return not self.threads()
