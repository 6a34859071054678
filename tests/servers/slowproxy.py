"""
A TCP proxy on loopback that holds back the server's first bytes on every
connection for a fixed delay: a slow directory, for the tests that prove the
reactor keeps running while a directory answers slowly.

Plain threads and blocking sockets (nothing here may use the reactor it is
meant to observe); every wait has a timeout and every thread is joined on
L{DelayingProxy.stop}.
"""

from __future__ import annotations

import socket
import threading
import time


class DelayingProxy:
    """
    Listen on C{127.0.0.1:<free port>}, forward each connection to
    C{target}, and delay the first server-to-client bytes by C{delay}
    seconds.
    """

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self._target = target
        self._delay = delay
        self._stopping = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._spawn(self._accept_loop)

    def _spawn(self, target: object, *args: object) -> None:
        assert callable(target)
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(0.1)
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, 0.0)
            self._spawn(self._pump, upstream, client, self._delay)

    def _pump(self, source: socket.socket, sink: socket.socket, delay: float) -> None:
        held = delay > 0
        while not self._stopping.is_set():
            try:
                data = source.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            if held:
                held = False
                self._stopping.wait(delay)
            try:
                sink.sendall(data)
            except OSError:
                break
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        """Close everything and join the threads (each within a second or so)."""
        self._stopping.set()
        self._listener.close()
        deadline = time.monotonic() + 10
        with self._lock:
            threads = list(self._threads)
            sockets = list(self._sockets)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for s in sockets:
            s.close()


class BlackHole:
    """
    Listen on C{127.0.0.1:<free port>}, accept every connection, read and
    discard what it is sent, and never answer: a directory server that hangs.

    @ivar accepted: how many connections it accepted so far.
    """

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                pass
            else:
                client.setblocking(False)
                self._sockets.append(client)
                self.accepted += 1
            for s in list(self._sockets):
                try:
                    s.recv(65536)  # discard; an empty read (closed) just stays
                except (BlockingIOError, OSError):
                    pass

    def stop(self) -> None:
        """Close the listener and every accepted connection; join the thread."""
        self._stopping.set()
        self._thread.join(10)
        self._listener.close()
        for s in self._sockets:
            s.close()
