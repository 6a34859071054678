"""
The part the scripted SMTP fixtures share: a socketserver served on a
daemon thread, its port, start and stop.
"""

from __future__ import annotations

import socketserver
import threading
from typing import Self


class ServedInThread:
    """Serves C{self._server} (set by L{_serve}) on a daemon thread from L{start} to L{stop}."""

    _server: socketserver.TCPServer
    _thread: threading.Thread

    def _serve(self, server: socketserver.TCPServer) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
