"""
The service-free parts of reload and graceful stop (relaygw.reload): which
sockets a new configuration closes and opens, and the bounded wait for the
sessions in progress, on a task.Clock.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relaygw.config._model import Binding
from relaygw.listen.bindings import ListenSocket
from relaygw.reload import Sessions, socket_changes


def _socket(port: int, *names: str) -> ListenSocket:
    binding = Binding("127.0.0.1", port)
    return ListenSocket(binding, (binding,), names)


def test_socket_changes() -> None:
    """Kept sockets stay; removed ones close; new ones open; a changed one is closed and opened."""
    running = [_socket(25, "A"), _socket(587, "B"), _socket(2525, "C")]
    planned = [_socket(25, "A"), _socket(587, "B", "D"), _socket(465, "E")]
    close, open_ = socket_changes(running, planned)
    assert close == [1, 2]
    assert open_ == [_socket(587, "B", "D"), _socket(465, "E")]
    assert socket_changes(running, running) == ([], [])


class _Transport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class _Session:
    def __init__(self) -> None:
        self.finished = False
        self.transport = _Transport()


def _drain(sessions: Sessions, clock: Clock, grace: float) -> Deferred[int]:
    return Deferred.fromCoroutine(sessions.drain(clock, grace))


def test_drain_waits_for_sessions_to_end() -> None:
    clock, sessions = Clock(), Sessions()
    held = [_Session(), _Session()]
    for s in held:
        sessions.add(s)
    done = _drain(sessions, clock, grace=30)
    clock.advance(5)
    assert not done.called
    held[0].finished = True
    clock.advance(5)
    assert not done.called
    held[1].finished = True
    clock.advance(0.1)
    assert done.result == 0
    assert not any(s.transport.aborted for s in held)


def test_drain_cuts_sessions_after_the_grace() -> None:
    clock, sessions = Clock(), Sessions()
    slow, quick = _Session(), _Session()
    sessions.add(slow)
    sessions.add(quick)
    quick.finished = True
    done = _drain(sessions, clock, grace=2)
    clock.pump([0.1] * 25)
    assert done.result == 1
    assert slow.transport.aborted and not quick.transport.aborted


def test_drain_with_nothing_open_is_immediate() -> None:
    done = _drain(Sessions(), Clock(), grace=30)
    assert done.result == 0
