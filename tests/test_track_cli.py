"""
Tests for C{relaygw track} (SPEC section 6): every filter, the table and
C{--json}, C{--since} as a duration and as a time, rotated files.  The
files are written by the real L{TrackingLog} from events shaped like the
session's and the scheduler's.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.defer import succeed

from relaygw.cli.main import run
from relaygw.cli.track import Query, parse_since
from relaygw.ops.tracking import TrackingLog, tracking_dir

_CONFIG = """
[gateway]
hostname = "mx.example.test"
spool_dir = "spool"
log_dir = "log"

[[accepted_domains]]
domain = "corp.test"
route = "local"

[[connectors]]
name = "Default"
bindings = ["127.0.0.1:2525"]
remote_ranges = ["0.0.0.0-255.255.255.255"]
tls = "off"

[[routes]]
name = "local"
via = "maildir"
maildir = "mail"
"""

NOW = time.time()
DAY = 86400.0


def _received(when: float, queue_id: str, sender: str, rcpts: list[str], *, connector: str,
              peer: str, message_id: str) -> dict[str, Any]:
    return {"event": "receive.queued", "log_time": when, "queue_id": queue_id,
            "message_id": message_id, "connector": connector, "peer": peer, "helo": "printer",
            "auth_user": None, "sender": sender, "recipients": rcpts, "size": 321,
            "smtp_code": 250}


def _delivery(when: float, kind: str, queue_id: str, sender: str, rcpt: str,
              reply: str) -> dict[str, Any]:
    return {"event_id": kind, "log_time": when, "queue_id": queue_id, "sender": sender,
            "recipient": rcpt, "reply": reply, "remote_host": "127.0.0.1", "size": 321,
            "connector": "Printers", "client_ip": "10.1.2.3"}


def _write(log_dir: Path, events: list[Mapping[str, Any]], **kwargs: Any) -> None:
    clock = Clock()
    clock.advance(NOW)
    log = TrackingLog(log_dir, clock, run=lambda work: succeed(work()), **kwargs)
    for event in events:
        log(event)
    log.stop()


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "relaygw.toml"
    path.write_text(_CONFIG)
    # Two days of rows; the older day's file was rotated (-1 full, -2 continued).
    old = NOW - 2 * DAY
    _write(tmp_path / "log", [
        _received(old, "OLD1", "ann@corp.test", ["bob@corp.test"], connector="Default",
                  peer="192.0.2.7:40000", message_id="<old@corp.test>"),
        _received(old + 1, "OLD2", "ann@corp.test", ["eve@corp.test"], connector="Default",
                  peer="192.0.2.8:40001", message_id="<old2@corp.test>"),
    ], max_bytes=400)
    _write(tmp_path / "log", [
        _received(NOW - 60, "NEW1", "scanner@corp.test", ["bob@corp.test", "carol@remote.test"],
                  connector="Printers", peer="10.1.2.3:5000", message_id="<scan-1@corp.test>"),
        _delivery(NOW - 50, "DELIVER", "NEW1", "scanner@corp.test", "bob@corp.test",
                  "250 2.0.0 Ok: queued"),
        _delivery(NOW - 40, "DEFER", "NEW1", "scanner@corp.test", "carol@remote.test",
                  "451 4.2.0 mailbox busy, try later"),
        _received(NOW - 30, "NEW2", "app@corp.test", ["dave@corp.test"], connector="Apps",
                  peer="2001:db8::5:6000", message_id="<app-2@corp.test>"),
    ])
    return str(path)


def _track(config_file: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run(["track", "-c", config_file, *args], out, err)
    return status, out.getvalue(), err.getvalue()


def _ids(config_file: str, *args: str) -> list[tuple[str, str, str]]:
    status, out, err = _track(config_file, "--json", *args)
    assert status == 0, err
    return [(r["internal-message-id"], r["event-id"], r["recipient-address"])
            for r in json.loads(out)]


def test_the_files_were_rotated(config_file: str) -> None:
    """The fixture's old day spans two files: the reader must open both."""
    names = sorted(p.name for p in tracking_dir(Path(config_file).parent / "log").iterdir())
    assert len(names) == 3, names
    assert ("OLD1", "RECEIVE", "bob@corp.test") in _ids(config_file)
    assert ("OLD2", "RECEIVE", "eve@corp.test") in _ids(config_file)


def test_no_filter_lists_every_row_in_order(config_file: str) -> None:
    assert _ids(config_file) == [
        ("OLD1", "RECEIVE", "bob@corp.test"),
        ("OLD2", "RECEIVE", "eve@corp.test"),
        ("NEW1", "RECEIVE", "bob@corp.test"),
        ("NEW1", "RECEIVE", "carol@remote.test"),
        ("NEW1", "DELIVER", "bob@corp.test"),
        ("NEW1", "DEFER", "carol@remote.test"),
        ("NEW2", "RECEIVE", "dave@corp.test"),
    ]


@pytest.mark.parametrize("args, expected", [
    (["--sender", "SCANNER@corp.test"], {"NEW1"}),
    (["--sender", "*@corp.test", "--event", "defer"], {"NEW1"}),
    (["--recipient", "dave@corp.test"], {"NEW2"}),
    (["--recipient", "bob@*"], {"OLD1", "NEW1"}),
    (["--message-id", "scan-1@corp.test"], {"NEW1"}),
    (["--message-id", "<app-2@corp.test>"], {"NEW2"}),
    (["--queue-id", "old2"], {"OLD2"}),
    (["--connector", "apps"], {"NEW2"}),
    (["--client-ip", "192.0.2.0/24"], {"OLD1", "OLD2"}),
    (["--client-ip", "2001:db8::5"], {"NEW2"}),
    (["--client-ip", "10.1.2.3", "--event", "RECEIVE"], {"NEW1"}),
    (["--since", "1h"], {"NEW1", "NEW2"}),
    (["--since", "1h", "--recipient", "eve@corp.test"], set()),
])
def test_each_filter(config_file: str, args: list[str], expected: set[str]) -> None:
    assert {queue_id for queue_id, _, _ in _ids(config_file, *args)} == expected


def test_event_filter_is_repeatable(config_file: str) -> None:
    rows = _ids(config_file, "--event", "DELIVER", "--event", "DEFER")
    assert rows == [("NEW1", "DELIVER", "bob@corp.test"), ("NEW1", "DEFER", "carol@remote.test")]


def test_since_a_utc_time(config_file: str) -> None:
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 45))
    assert _ids(config_file, "--since", start) == [
        ("NEW1", "DEFER", "carol@remote.test"), ("NEW2", "RECEIVE", "dave@corp.test")]


def test_table_has_the_columns_and_the_reply(config_file: str) -> None:
    status, out, _ = _track(config_file, "--queue-id", "NEW1")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["Time", "(UTC)", "Event", "Queue", "id", "Sender", "Recipient",
                                "Connector", "Client", "Status"]
    assert len(lines) == 1 + 4
    assert lines[-1].split()[1:7] == ["DEFER", "NEW1", "scanner@corp.test", "carol@remote.test",
                                      "Printers", "10.1.2.3"]
    assert lines[-1].endswith("451 4.2.0 mailbox busy, try later")


def test_json_has_every_field(config_file: str) -> None:
    status, out, _ = _track(config_file, "--json", "--queue-id", "NEW2")
    assert status == 0
    [row] = json.loads(out)
    assert row["client-ip"] == "2001:db8::5"
    assert row["connector-id"] == "Apps"
    assert row["total-bytes"] == "321"
    assert row["date-time"].endswith("Z")
    assert list(row) == ["date-time", "event-id", "internal-message-id", "message-id",
                         "connector-id", "client-ip", "auth-user", "sender-address",
                         "recipient-address", "recipient-status", "total-bytes", "remote-host"]


def test_nothing_found_is_not_an_error(config_file: str) -> None:
    assert _track(config_file, "--sender", "nobody@corp.test") == (0, "(no matching events)\n", "")
    assert _ids(config_file, "--sender", "nobody@corp.test") == []


def test_no_log_directory_reads_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "relaygw.toml"
    path.write_text(_CONFIG)
    assert _track(str(path)) == (0, "(no matching events)\n", "")


@pytest.mark.parametrize("args, problem", [
    (["--since", "yesterday"], "--since 'yesterday'"),
    (["--client-ip", "10.0.0.300"], "--client-ip '10.0.0.300'"),
    (["--event", "BOUNCE"], "--event 'BOUNCE'"),
])
def test_malformed_filters_are_named(config_file: str, args: list[str], problem: str) -> None:
    status, out, err = _track(config_file, *args)
    assert (status, out) == (1, "")
    assert err.startswith(f"relaygw track: {problem}")


def test_parse_since() -> None:
    assert parse_since("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_since("1970-01-01T01:00", 0.0) == 3600.0
    assert parse_since("1970-01-01T02:00+01:00", 0.0) == 3600.0
    with pytest.raises(ValueError):
        parse_since("soon", 0.0)


def test_query_without_filters_matches_all() -> None:
    rows = [{"event-id": "RECEIVE", "date-time": "2026-01-01T00:00:00.000Z"}]
    assert Query().select(rows) == rows
