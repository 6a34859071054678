"""
The per-message events: C{receive.queued} (a message committed),
C{receive.disconnect} (a session ended) and C{DELIVER} (a recipient
delivered), three or more for every message.

They go to L{MESSAGES}, not to the global log publisher: the message
tracking log and C{/metrics} observe them there, and twistd's own log
gets a copy only with C{gateway.log_messages = true} (L{TwistdCopy}).
Formatting three text lines per message cost about 15 % of the gateway's
CPU under load (bench/profile_load.py), and the tracking log already has
every one of them, as Exchange keeps them in its tracking log only.

Across processes: a child (receiving worker, delivery process) forwards its
per-message events into its own log stream, marked C{message_event}
(L{forward_to_parent}); the gateway re-publishes marked events to its
L{MESSAGES} again (L{republish}).  A child writes its events with
L{child_log_observer}: Twisted's JSON form, built cheaply for the plain
events that are nearly all of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    eventFromJSON,
    globalLogPublisher,
)
from zope.interface import implementer

__all__ = [
    "MESSAGES",
    "TwistdCopy",
    "child_log_observer",
    "event_from_child",
    "forward_to_parent",
    "is_copy",
    "republish",
]

#: Where the per-message events are published (see the module's text).
MESSAGES = LogPublisher()

_MARK = "message_event"
_COPY = "message_copy"


@implementer(ILogObserver)
class _ToParent:
    def __call__(self, event: Mapping[str, Any]) -> None:
        globalLogPublisher(dict(event, **{_MARK: True}))


def forward_to_parent() -> ILogObserver:
    """
    In a child process: every per-message event also goes to its log
    stream, marked.

    @return: the observer added to L{MESSAGES}.
    """
    observer = _ToParent()
    MESSAGES.addObserver(observer)
    return observer


def republish(event: dict[str, Any], publisher: ILogObserver) -> None:
    """In the gateway: a child's event to L{MESSAGES} when it is a per-message one, else to C{publisher}."""
    if event.pop(_MARK, False):
        MESSAGES(event)
    else:
        publisher(event)


@implementer(ILogObserver)
class TwistdCopy:
    """C{log_messages = true}: a copy of each per-message event for twistd's log."""

    def __call__(self, event: Mapping[str, Any]) -> None:
        globalLogPublisher(dict(event, **{_COPY: True}))


def is_copy(event: Mapping[str, Any]) -> bool:
    """Whether C{event} is L{TwistdCopy}'s copy (observers of both streams skip it)."""
    return bool(event.get(_COPY))


#: How L{twisted.logger.eventAsJSON} writes each level (eventFromJSON reads it back).
_LEVELS = {
    level: json.loads(eventAsJSON({"log_level": level}))["log_level"]
    for level in LogLevel.iterconstants()
}
#: Fields a child's event loses on the way (eventAsJSON writes them as
#: "unpersistable"; the text is rendered from log_format and the fields).
_DROPPED = ("log_logger", "log_source", "log_flattened", "log_level")


def _as_json(event: Mapping[str, Any]) -> str:
    """
    L{eventAsJSON}'s result for an event of plain fields, without its
    flattening and per-object fallbacks (about 8 % of the delivery process's
    time under load); anything else (a failure, bytes, objects) goes
    through L{eventAsJSON} itself.
    """
    if "log_failure" not in event:
        fields = {k: v for k, v in event.items() if k not in _DROPPED}
        level = _LEVELS.get(event.get("log_level"))  # type: ignore[arg-type]
        if level is not None:
            fields["log_level"] = level
        try:
            return json.dumps(fields, skipkeys=True)
        except (TypeError, ValueError):
            pass
    return eventAsJSON(dict(event))


_LEVEL_NAMED = {level.name: level for level in _LEVELS}


def event_from_child(record: bytes) -> dict[str, Any]:
    """
    A child's record (L{child_log_observer}) as an event: L{eventFromJSON}'s
    result, reading plain records without its per-object hook.

    @raise ValueError: the record is not JSON, or not an event.
    """
    event = json.loads(record)
    if not isinstance(event, dict):
        raise ValueError("a log record must be a JSON object")
    level = event.get("log_level")
    if "log_failure" in event or (level is not None and not isinstance(level, dict)):
        return eventFromJSON(record.decode("utf-8"))
    if level is not None:
        event["log_level"] = _LEVEL_NAMED.get(level.get("name"))  # {"name": ..., "__class_uuid__": ...}
    return event


def child_log_observer(out: IO[str]) -> FileLogObserver:
    """A child process's log to the gateway: JSON text sequence records, as L{twisted.logger.jsonFileLogObserver}."""
    return FileLogObserver(out, lambda event: f"\x1e{_as_json(event)}\n")
