"""
C{relaygw track} (SPEC section 6): search the message tracking log, like
Exchange's C{Get-MessageTrackingLog}, as a function returning C{(exit
status, text)}.

Decisions:
  - Every filter given must match (AND).  Addresses, connector names and
    events compare without case; C{*} and C{?} are wildcards in addresses
    and message ids (C{--sender '*@corp.test'}); a message id matches with
    or without its angle brackets.  C{--client-ip} takes an address or a
    CIDR.  C{--since} takes a duration back from now (C{30m}, C{2h},
    C{7d}) or a UTC time (C{2026-12-06T19:00}, C{Z} or an offset allowed).
  - Files whose day ended before C{--since} are not opened; rotated files
    (C{-2}, C{-3} ...) are read with the others, oldest first.
  - No matching row is not an error (exit 0, like an empty
    C{Get-MessageTrackingLog}); a missing log directory reads as empty.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone

import attrs

from relaygw.cli.commands import Result, load_config
from relaygw.config._units import parse_duration
from relaygw.ops.tracking import FIELDS, read_rows

__all__ = ["EVENTS", "Query", "parse_since", "track"]

EVENTS = ("RECEIVE", "DELIVER", "DEFER", "FAIL", "DSN", "EXPIRE")

#: The table's columns: (title, tracking field).  Every field is in C{--json}.
_COLUMNS = (
    ("Time (UTC)", "date-time"),
    ("Event", "event-id"),
    ("Queue id", "internal-message-id"),
    ("Sender", "sender-address"),
    ("Recipient", "recipient-address"),
    ("Connector", "connector-id"),
    ("Client", "client-ip"),
    ("Status", "recipient-status"),
)

Row = dict[str, str]


def parse_since(text: str, now: float) -> float:
    """
    C{--since}: a duration back from C{now}, or an ISO 8601 time (UTC unless
    it says otherwise).

    @raise ValueError: neither.
    """
    try:
        return now - parse_duration(text).total_seconds()
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give a duration (30m, 2h, 7d) or a UTC time"
            " (2026-12-06T19:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _stamp(row: Row) -> float | None:
    try:
        return datetime.fromisoformat(row["date-time"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None


def _pattern(value: str) -> Callable[[str], bool]:
    wanted = value.strip().lower()
    if any(c in wanted for c in "*?["):
        return lambda text: fnmatch.fnmatchcase(text.lower(), wanted)
    return lambda text: text.lower() == wanted


def _message_id(value: str) -> Callable[[str], bool]:
    match = _pattern(value.strip().strip("<>"))
    return lambda text: match(text.strip().strip("<>"))


def _client(value: str) -> Callable[[str], bool]:
    network = ipaddress.ip_network(value.strip().strip("[]"), strict=False)

    def matches(text: str) -> bool:
        try:
            return ipaddress.ip_address(text.strip("[]")) in network
        except ValueError:
            return False

    return matches


@attrs.frozen
class Query:
    """What C{relaygw track} looks for; C{None} is no filter."""

    sender: str | None = None
    recipient: str | None = None
    message_id: str | None = None
    queue_id: str | None = None
    connector: str | None = None
    client_ip: str | None = None
    events: Sequence[str] = ()
    since: float | None = None

    def tests(self) -> list[tuple[str, Callable[[str], bool]]]:
        """
        (field, predicate) for each filter given.

        @raise ValueError: a filter value is malformed (a client IP, an event).
        """
        tests: list[tuple[str, Callable[[str], bool]]] = []
        for field, value, make in (
            ("sender-address", self.sender, _pattern),
            ("recipient-address", self.recipient, _pattern),
            ("message-id", self.message_id, _message_id),
            ("internal-message-id", self.queue_id, _pattern),
            ("connector-id", self.connector, _pattern),
        ):
            if value is not None:
                tests.append((field, make(value)))
        if self.client_ip is not None:
            try:
                tests.append(("client-ip", _client(self.client_ip)))
            except ValueError:
                raise ValueError(
                    f"--client-ip {self.client_ip!r}: give an IP address or a CIDR"
                ) from None
        if self.events:
            wanted = {e.upper() for e in self.events}
            unknown = sorted(wanted.difference(EVENTS))
            if unknown:
                raise ValueError(f"--event {unknown[0]!r}: one of {', '.join(EVENTS)}")
            tests.append(("event-id", lambda text: text in wanted))
        return tests

    def select(self, rows: Iterable[Row]) -> list[Row]:
        """The rows matching every filter, in file order."""
        tests = self.tests()
        found = []
        for row in rows:
            if self.since is not None:
                when = _stamp(row)
                if when is None or when < self.since:
                    continue
            if all(test(row.get(field, "")) for field, test in tests):
                found.append(row)
        return found


def _table(rows: list[Row]) -> str:
    if not rows:
        return "(no matching events)"
    cells = [[title for title, _ in _COLUMNS]]
    cells += [[row.get(field, "") for _, field in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS) - 1)]
    # The status (a reply) goes last and unpadded: it is the long one.
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(line, widths)), line[-1]]).rstrip()
             for line in cells]
    return "\n".join(lines)


def track(config_path: str | None, query: Query, *, as_json: bool = False) -> Result:
    """
    Search the tracking files of the configuration's C{gateway.log_dir}.

    @raise ConfigError: the configuration is invalid.
    """
    config = load_config(config_path)
    try:
        query.tests()  # malformed filters fail before any file is read
    except ValueError as error:
        return 1, f"relaygw track: {error}"
    try:
        rows = query.select(read_rows(config.gateway.log_dir, since=query.since))
    except OSError as error:
        return 1, f"relaygw track: cannot read the message tracking log: {error}"
    if as_json:
        return 0, json.dumps([{name: row.get(name, "") for name in FIELDS} for row in rows],
                             indent=2)
    return 0, _table(rows)

