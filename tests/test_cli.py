"""
Tests for the C{relaygw} command line (SPEC section 6): check-config,
connectors, which-connector.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from relaygw.cli import commands
from relaygw.cli.main import run
from relaygw.config._model import Binding
from relaygw.errors import ConfigError

_CONFIG = """
[gateway]
hostname = "mx.example.test"
spool_dir = "spool"
log_dir = "log"

[[accepted_domains]]
domain = "example.test"
route = "local"

[[connectors]]
name = "Default"
bindings = ["127.0.0.1:2525"]
remote_ranges = ["0.0.0.0-255.255.255.255"]
tls = "off"

[[connectors]]
name = "Printers"
bindings = ["0.0.0.0:2525"]
remote_ranges = ["127.0.0.10/31", "10.0.0.0/8"]
tls = "off"

[[connectors]]
name = "Old"
bindings = ["127.0.0.1:2626"]
remote_ranges = ["127.0.0.0/8"]
enabled = false
tls = "off"

[[routes]]
name = "local"
via = "maildir"
maildir = "mail"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    path = tmp_path / "relaygw.toml"
    path.write_text(_CONFIG)
    return str(path)


@pytest.fixture
def bad_config_file(tmp_path: Path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(_CONFIG.replace('"127.0.0.10/31"', '"192.168.0.300"'))
    return str(path)


def test_check_config_ok_names_the_file(config_file: str) -> None:
    """check-config on a valid file prints "configuration OK: <file>", status 0."""
    assert commands.check_config(config_file) == (0, f"configuration OK: {config_file}")


def test_check_config_default() -> None:
    """Without -c, check-config validates the embedded default."""
    assert commands.check_config(None) == (0, "configuration OK: <embedded default>")


def test_check_config_error_is_the_config_error(bad_config_file: str) -> None:
    """check-config on a bad file returns status 1 and the file, key path and problem."""
    status, text = commands.check_config(bad_config_file)
    assert status == 1
    assert text.startswith(f"{bad_config_file}: connectors[1].remote_ranges[0]: ")
    assert "192.168.0.300" in text


def test_connectors_table_lists_every_value(config_file: str) -> None:
    """
    The connectors table has a header and, per connector, its name, each
    binding and range, and whether it is enabled.
    """
    status, text = commands.connectors(config_file)
    lines = text.splitlines()
    assert status == 0
    assert lines[0].split() == ["NAME", "BINDINGS", "REMOTE", "RANGES", "ENABLED"]
    assert lines[1].split() == ["Default", "127.0.0.1:2525", "0.0.0.0-255.255.255.255", "yes"]
    assert lines[2].split() == ["Printers", "0.0.0.0:2525", "127.0.0.10/31", "yes"]
    assert lines[3].split() == ["10.0.0.0/8"]
    assert lines[4].split() == ["Old", "127.0.0.1:2626", "127.0.0.0/8", "no"]


def test_connectors_bad_config_raises(bad_config_file: str) -> None:
    """connectors with an invalid configuration raises the ConfigError."""
    with pytest.raises(ConfigError):
        commands.connectors(bad_config_file)


def test_which_connector_winner_and_beaten(config_file: str) -> None:
    """
    which-connector prints the winner first, then each candidate it beat
    with its matching range and that range's size in addresses.
    """
    status, text = commands.which_connector(
        config_file, Binding("127.0.0.1", 2525), "127.0.0.11"
    )
    assert status == 0
    assert text.splitlines() == [
        "Printers",
        "  beat Default: 0.0.0.0-255.255.255.255 (4294967296 addresses)",
    ]


def test_which_connector_single_candidate(config_file: str) -> None:
    """A connection only one connector's range holds prints just its name."""
    status, text = commands.which_connector(
        config_file, Binding("127.0.0.1", 2525), "127.0.0.1"
    )
    assert (status, text) == (0, "Default")


def test_which_connector_none(config_file: str) -> None:
    """
    No candidate (a disabled connector's binding) prints "(none)" with
    status 1.
    """
    assert commands.which_connector(
        config_file, Binding("127.0.0.1", 2626), "127.0.0.1"
    ) == (1, "(none)")


def test_run_prints_and_returns_status(config_file: str) -> None:
    """The console script prints the command's text on stdout and returns its status."""
    out, err = io.StringIO(), io.StringIO()
    status = run(
        ["which-connector", "-c", config_file, "--local", "127.0.0.1:2626", "--remote", "127.0.0.1"],
        out,
        err,
    )
    assert (status, out.getvalue(), err.getvalue()) == (1, "(none)\n", "")


def test_run_config_error_on_stderr(bad_config_file: str) -> None:
    """A configuration error goes to stderr with status 1."""
    out, err = io.StringIO(), io.StringIO()
    status = run(["connectors", "-c", bad_config_file], out, err)
    assert status == 1
    assert out.getvalue() == ""
    assert "connectors[1].remote_ranges[0]" in err.getvalue()


def test_run_rejects_bad_local(capsys: pytest.CaptureFixture[str]) -> None:
    """A --local that is not ADDR:PORT is a usage error (status 2)."""
    with pytest.raises(SystemExit) as exited:
        run(["which-connector", "--local", "localhost:25", "--remote", "127.0.0.1"])
    assert exited.value.code == 2
    assert "--local" in capsys.readouterr().err


# -- user add / user delete / test-auth (issue 3) -------------------------------


def _fired(d: object) -> tuple[int, str]:
    from twisted.internet.defer import Deferred

    assert isinstance(d, Deferred)
    out: list[tuple[int, str]] = []
    d.addCallback(out.append)
    assert out, "test-auth did not complete synchronously"
    return out[0]


def _run(argv: list[str], stdin: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run(argv, stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return status, out.getvalue(), err.getvalue()


def test_user_add_reads_stdin_and_never_prints_password(config_file: str) -> None:
    """user add takes the password from stdin, writes the users file, prints no password."""
    status, out, err = _run(["user", "add", "-c", config_file, "alice", "--address",
                             "alice@example.test", "--group", "Relay"], "s3cret-pw\n")
    users = Path(config_file).parent / "users"
    assert status == 0, err
    assert out.strip() == f"user alice added to {users}"
    assert "s3cret-pw" not in out + err + users.read_text()
    assert _fired(commands.test_auth(config_file, "alice", "s3cret-pw"))[0] == 0


def test_user_add_refuses_empty_password(config_file: str) -> None:
    """An empty password is refused and nothing is written."""
    status, _, err = _run(["user", "add", "-c", config_file, "alice"], "\n")
    assert status == 1 and "empty" in err
    assert not (Path(config_file).parent / "users").exists()


def test_user_add_prompts_twice_on_a_tty(config_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the password is prompted twice; differing entries are refused."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    err = io.StringIO()
    status = run(["user", "add", "-c", config_file, "alice"], stdout=io.StringIO(),
                 stderr=err, stdin=Tty())
    assert status == 1 and "differ" in err.getvalue()


def test_user_delete(config_file: str) -> None:
    """user delete removes a user; deleting an unknown user is status 1."""
    _run(["user", "add", "-c", config_file, "alice"], "pw\n")
    assert _run(["user", "delete", "-c", config_file, "alice"], "")[0] == 0
    status, _, err = _run(["user", "delete", "-c", config_file, "alice"], "")
    assert status == 1 and "no user alice" in err


def test_test_auth_prints_addresses_groups_rights(tmp_path: Path) -> None:
    """test-auth prints the user's addresses, groups and rights on each connector."""
    path = tmp_path / "relaygw.toml"
    path.write_text(_CONFIG.replace(
        'name = "Printers"',
        'name = "Printers"\ngrants = [ { group = "relay", rights = ["accept-any-sender"] } ]'))
    commands.user_add(str(path), "scanner", "pw", ["scan@example.test"], ["Relay"])
    status, text = _fired(commands.test_auth(str(path), "SCANNER", "pw"))
    assert status == 0
    assert text.splitlines() == [
        "authenticated: scanner",
        "addresses: scan@example.test",
        "groups: Relay",
        "rights:",
        "  Default: relay, submit",
        "  Printers: accept-any-sender, relay, submit",
        "  Old: relay, submit",
    ]


def test_test_auth_wrong_password(config_file: str) -> None:
    """test-auth with a wrong password is status 1 and never shows the password."""
    commands.user_add(config_file, "alice", "right", [], [])
    status, text = _fired(commands.test_auth(config_file, "alice", "wrong-pw"))
    assert status == 1 and "wrong-pw" not in text


def test_help_names_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """`relaygw --help` names every subcommand of SPEC section 6."""
    with pytest.raises(SystemExit) as exit:
        run(["--help"])
    assert exit.value.code == 0
    listed = capsys.readouterr().out
    for command in ("check-config", "connectors", "which-connector", "user", "test-auth",
                    "queue", "track"):
        assert f"\n    {command} " in listed or f"\n    {command}\n" in listed


def test_queue_help_names_its_actions(capsys: pytest.CaptureFixture[str]) -> None:
    """`relaygw queue --help` names list, show, retry and delete."""
    with pytest.raises(SystemExit):
        run(["queue", "--help"])
    listed = capsys.readouterr().out
    for action in ("list", "show", "retry", "delete"):
        assert f"\n    {action} " in listed

