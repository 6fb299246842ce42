"""A TCP forwarder that counts round trips on the wire, whatever the driver or its protocol.

A round trip starts when a client sends after the server answered it (or for the first time):
bytes a client sends in one go, or in pieces before any answer (a pipeline), are one round trip;
answers that come without the client sending again (a woken ``BLPOP`` with the ``SET`` behind
it, a granted ``pg_advisory_lock``) add none. The count needs nothing from the driver or from the
server, so it cannot be fooled by either, and nobody else's traffic on the server is in it.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading

CHUNK = 65536


class _Link:
    """One client connection and its connection to the server."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.answered = True  # no request of the client's is waiting for an answer


class CountingProxy:
    """Listens on 127.0.0.1 (``port``) and forwards every connection to ``host:port``,
    counting the round trips of all of them in ``trips``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.trips = 0
        self._links: dict[socket.socket, _Link] = {}
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._stop, self._stopped = socket.socketpair()
        self._selector.register(self._stopped, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="counting-proxy", daemon=True)
        self._thread.start()

    def server_ports(self) -> set[int]:
        """The local ports of its connections to the server: how the server names them (Redis
        ``CLIENT LIST`` addr, PostgreSQL ``pg_stat_activity.client_port``)."""
        ports = set()
        for link in list(self._links.values()):
            with contextlib.suppress(OSError):  # closed meanwhile
                ports.add(link.server.getsockname()[1])
        return ports

    def close(self) -> None:
        self._stop.send(b"x")
        self._thread.join(5)
        self._stop.close()

    def _serve(self) -> None:
        while True:
            for key, _ in self._selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._stopped:
                    self._shut()
                    return
                if sock is self._listener:
                    self._accept()
                else:
                    self._forward(sock)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()  # the client sees the server as unreachable
            return
        server.settimeout(None)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, server)
        self._links[client] = self._links[server] = link
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(server, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        link = self._links.get(sock)
        if link is None:  # dropped by its other end's event of the same select()
            return
        try:
            data = sock.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            self._drop(link)
            return
        if sock is link.client:
            if link.answered:
                self.trips += 1
                link.answered = False
            peer = link.server
        else:
            link.answered = True
            peer = link.client
        try:
            peer.sendall(data)
        except OSError:
            self._drop(link)

    def _drop(self, link: _Link) -> None:
        for sock in (link.client, link.server):
            self._links.pop(sock, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            sock.close()

    def _shut(self) -> None:
        for link in list(self._links.values()):
            self._drop(link)
        self._selector.close()
        self._listener.close()
        self._stopped.close()
