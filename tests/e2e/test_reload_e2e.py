"""
SIGHUP and SIGTERM on a real gateway (issue 8, "Must work" 4).

SIGHUP during 20 open sessions loses none of them; afterwards new sessions
get the new banner, a new binding listens, a removed one is closed, and the
delivery process routes by the new file.  An invalid file is refused with
SPEC section 2's message and the running configuration stays.  SIGTERM
stops listening at once, lets a session in the middle of DATA finish with
its 250, and exits 0 with that message in the spool or delivered.

(C{relaygw user add} taking effect without a restart is shown by
tests/e2e/test_auth_e2e.py, which adds users while the gateway runs.)
"""

from __future__ import annotations

import signal
import smtplib
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Launch, gateway_toml, maildir_messages, smtp, spool_entries
from tests.servers.ports import free_ports, wait_until

pytestmark = pytest.mark.e2e

SESSIONS = 20


def _config(admin: int, ports: dict[str, int], banner: str, maildir: str) -> str:
    text = gateway_toml(admin) + f"""
[[accepted_domains]]
domain = "example.test"
route = "local"

[[routes]]
name = "local"
via = "maildir"
maildir = "{maildir}"
"""
    for name, port in ports.items():
        text += f"""
[[connectors]]
name = "{name}"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
banner = "{{fqdn}} {banner} {name}"
max_connections_per_ip = 50
"""
    return text


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _message(n: int) -> bytes:
    return f"Subject: reload {n}\r\n\r\nbody {n}\r\n".encode()


def test_sighup_keeps_sessions_and_swaps_bindings(launch: Launch, workdir: Path) -> None:
    main, old, new, admin = free_ports(4)
    gw = launch(workdir / "gw", _config(admin, {"Main": main, "Old": old}, "one", "var/mail"),
                [main, old])
    sessions: list[smtplib.SMTP] = []
    try:
        for _ in range(SESSIONS):
            client, code, banner = smtp(main)
            assert code == 220 and b"one Main" in banner
            client.ehlo("printer.e2e.test")
            assert client.mail("printer@example.test")[0] == 250
            assert client.rcpt("alice@example.test")[0] == 250
            sessions.append(client)

        client, _, _ = smtp(main)
        client.sendmail("printer@example.test", ["dave@example.test"], _message(-1))
        client.quit()
        wait_until(lambda: len(maildir_messages(workdir / "gw" / "var" / "mail", "dave")) == 1,
                   30, 0.1, "the message before the reload")
        assert gw.config_path is not None
        mark = len(gw.output())
        gw.config_path.write_text(
            _config(admin, {"Main": main, "New": new}, "two", "var/mail2"))
        gw.send_signal(signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in gw.output()[mark:], 20, 0.05,
                   "the reload")
        wait_until(lambda: "delivery process: configuration reloaded" in gw.output()[mark:],
                   20, 0.05, "the delivery process's reload")

        # The sessions opened before the reload finish their transactions.
        for n, client in enumerate(sessions):
            code, _ = client.data(_message(n))
            assert code == 250, n
            client.quit()
        sessions.clear()

        client, code, banner = smtp(main)
        assert code == 220 and b"two Main" in banner
        client.quit()
        client, code, banner = smtp(new)
        assert code == 220 and b"two New" in banner
        client.sendmail("printer@example.test", ["bob@example.test"], _message(99))
        client.quit()
        assert _refused(old)

        # Delivered after the reload: the delivery process routes by the new file.
        mail = gw.workdir / "var"
        wait_until(lambda: len(maildir_messages(mail / "mail2", "alice")) == SESSIONS, 30, 0.1,
                   "the 20 messages in the new Maildir")
        wait_until(lambda: len(maildir_messages(mail / "mail2", "bob")) == 1, 30, 0.1,
                   "bob's message in the new Maildir")
        assert len(maildir_messages(mail / "mail")) == 1  # the one before the reload
        assert gw.running()
    finally:
        for client in sessions:
            client.close()


def test_invalid_file_keeps_the_running_configuration(launch: Launch, workdir: Path) -> None:
    main, admin = free_ports(2)
    gw = launch(workdir / "gw", _config(admin, {"Main": main}, "one", "var/mail"), [main])
    assert gw.config_path is not None
    mark = len(gw.output())
    gw.config_path.write_text(
        _config(admin, {"Main": main}, "two", "var/mail") + "\n[queue]\nretyr = 1\n")
    gw.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in gw.output()[mark:], 20, 0.05, "the refusal")
    refusal = next(line for line in gw.output()[mark:].splitlines() if "reload refused" in line)
    assert str(gw.config_path) in refusal
    assert gw.running()
    client, code, banner = smtp(main)
    assert code == 220 and b"one Main" in banner
    client.quit()


def test_sigterm_lets_a_session_in_data_finish(launch: Launch, workdir: Path) -> None:
    main, admin = free_ports(2)
    gw = launch(workdir / "gw", _config(admin, {"Main": main}, "one", "var/mail"), [main])
    client, code, _ = smtp(main)
    assert code == 220
    client.ehlo("printer.e2e.test")
    client.mail("printer@example.test")
    client.rcpt("carol@example.test")
    assert client.docmd("DATA")[0] == 354
    assert client.sock is not None
    client.sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
    gw.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopped listening" in gw.output(), 10, 0.05, "the listener to close")
    assert _refused(main)
    time.sleep(0.5)
    client.sock.sendall(b"second half\r\n.\r\n")
    code, reply = client.getreply()
    assert code == 250, reply
    client.quit()
    assert gw.proc is not None
    assert gw.proc.wait(timeout=40) == 0
    spool = gw.workdir / "var" / "spool"
    delivered = maildir_messages(gw.workdir / "var" / "mail", "carol")
    queued = spool_entries(spool)
    assert len(delivered) + len([p for p in queued if p.suffix == ".msg"]) == 1
    text = (delivered or queued)[0].read_bytes() if delivered else b""
    assert not delivered or b"second half" in text
