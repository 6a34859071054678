"""
The shipped configurations load: every sample in C{etc/} and the embedded
default (DESIGN habit 15: samples are loaded by a test so they cannot rot).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygw.config import Binding, load, load_default

ETC = Path(__file__).resolve().parent.parent / "etc"
SAMPLES = sorted(ETC.glob("*.toml"))


def test_samples_exist() -> None:
    """etc/relaygw.toml is among the samples, so the parametrised test runs."""
    assert ETC / "relaygw.toml" in SAMPLES


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_loads(path: Path) -> None:
    """Every etc/*.toml is a valid configuration."""
    assert load(path).connectors


def test_sample_exchange_connectors() -> None:
    """The sample has the three Exchange-style connectors and the anonymous relay
    connector, which shares port 25 with Default Frontend."""
    config = load(ETC / "relaygw.toml")
    by_name = {c.name: c for c in config.connectors}
    assert set(by_name) == {
        "Default Frontend", "Anonymous Relay", "Client Frontend", "Client Frontend TLS"
    }
    assert by_name["Anonymous Relay"].bindings == by_name["Default Frontend"].bindings
    assert "relay" in by_name["Anonymous Relay"].permissions_anonymous
    assert "relay" not in by_name["Default Frontend"].permissions_anonymous
    assert by_name["Client Frontend TLS"].tls == "implicit"
    assert config.directory is not None and config.directory.kind == "active-directory"
    assert {r.via for r in config.routes} == {"mx", "smarthost", "maildir"}


def test_default_loads() -> None:
    """The embedded default loads, named "<embedded default>" in messages."""
    assert load_default().source == "<embedded default>"


def test_default_listens_on_loopback_only() -> None:
    """The embedded default listens on 127.0.0.1 ports 2525, 5870 and 4650 only."""
    config = load_default()
    bindings = [b for c in config.connectors for b in c.bindings]
    assert bindings == [Binding("127.0.0.1", 2525), Binding("127.0.0.1", 5870), Binding("127.0.0.1", 4650)]
    assert config.gateway.admin_listen is not None
    assert config.gateway.admin_listen.host == "127.0.0.1"


def test_default_connector_rights() -> None:
    """2525 is anonymous without relay; 5870 and 4650 need AUTH, which grants relay."""
    default, submission, implicit = load_default().connectors
    assert default.permissions_anonymous == {"submit", "accept-authoritative-sender"}
    assert (submission.tls, submission.require_tls) == ("starttls", True)
    assert implicit.tls == "implicit"
    for c in (submission, implicit):
        assert c.permissions_anonymous == frozenset()
        assert c.permissions_authenticated == {"submit", "relay"}


def test_default_delivers_example_test_to_maildir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """example.test goes to ./var/mail; other domains to the "internet" MX route."""
    monkeypatch.chdir(tmp_path)
    config = load_default()
    domain = config.accepted_domain("Example.Test.")
    assert domain is not None and domain.route == "local"
    assert config.route("local").via == "maildir"
    assert config.route("local").maildir == tmp_path / "var" / "mail"
    assert config.gateway.default_route == "internet"
    assert config.route("internet").via == "mx"
    assert config.users is not None and config.users.file == tmp_path / "var" / "users"
    assert {c.certificate for c in config.connectors} == {tmp_path / "var" / "tls" / "relaygw.pem"}
