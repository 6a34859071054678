"""
The C{relaygw} subcommands as plain functions returning C{(exit status,
text)}, so tests call them directly; L{relaygw.cli.main} parses arguments
and prints.

A configuration that does not load raises L{ConfigError} (except in
L{check_config}, whose job is to report it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from relaygw.config._load import load, load_default
from relaygw.config._model import Binding, Config
from relaygw.errors import ConfigError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorFromThreads
    from twisted.python.threadpool import ThreadPool

__all__ = [
    "check_config",
    "connectors",
    "load_config",
    "test_auth",
    "user_add",
    "user_delete",
    "which_connector",
]

Result = tuple[int, str]


def load_config(path: str | None) -> Config:
    """
    @param path: a configuration file, or C{None} for the embedded default.
    @raise ConfigError: the configuration is invalid.
    """
    return load(path) if path is not None else load_default()


def check_config(path: str | None) -> Result:
    """
    C{relaygw check-config}: validate.

    @return: C{(0, "configuration OK: <file>")}, or C{(1, <the error>)}.
    """
    try:
        config = load_config(path)
    except ConfigError as error:
        return 1, str(error)
    return 0, f"configuration OK: {config.source}"


def connectors(path: str | None) -> Result:
    """
    C{relaygw connectors}: a table of the connectors (name, bindings, remote
    ranges, enabled), one row per connector; a connector with several
    bindings or ranges continues on the following lines.

    @raise ConfigError: the configuration is invalid.
    """
    config = load_config(path)
    rows: list[tuple[str, str, str, str]] = [("NAME", "BINDINGS", "REMOTE RANGES", "ENABLED")]
    for connector in config.connectors:
        bindings = [str(b) for b in connector.bindings]
        ranges = [r.text for r in connector.remote_ranges]
        for line in range(max(len(bindings), len(ranges), 1)):
            rows.append(
                (
                    connector.name if line == 0 else "",
                    bindings[line] if line < len(bindings) else "",
                    ranges[line] if line < len(ranges) else "",
                    ("yes" if connector.enabled else "no") if line == 0 else "",
                )
            )
    return 0, _table(rows)


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def which_connector(path: str | None, local: Binding, remote: str) -> Result:
    """
    C{relaygw which-connector}: the connector a connection from C{remote} to
    C{local} would get.

    @param local: the local address and port the client connects to.
    @param remote: the client's IP address.
    @return: C{(0, text)} whose first line is the winner's name, followed by
        one line per candidate it beat with its matching range and that
        range's size in addresses; C{(1, "(none)")} when no connector takes
        the connection.
    @raise ConfigError: the configuration is invalid.
    @raise ValueError: C{remote} is not an IP address.
    """
    from relaygw.connectors.selector import ConnectorSelector

    config = load_config(path)
    selection = ConnectorSelector(config.connectors).select(local.host, local.port, remote)
    if selection is None:
        return 1, "(none)"
    lines = [selection.connector.name]
    for candidate in selection.beaten:
        lines.append(
            f"  beat {candidate.connector.name}: {candidate.range.text}"
            f" ({candidate.range.size} addresses)"
        )
    return 0, "\n".join(lines)


def _users_file(config: Config) -> Path | None:
    return config.users.file if config.users is not None else None


def user_add(
    path: str | None, name: str, password: str, addresses: Sequence[str], groups: Sequence[str]
) -> Result:
    """
    C{relaygw user add}: add or replace a user of the C{[users].file}.

    @return: C{(0, "user NAME added to FILE")} (or "updated in"); C{(1,
        problem)} for an empty password, a bad name or address, or a
        configuration without a users file.  The password is never printed.
    @raise ConfigError: the configuration is invalid.
    """
    from relaygw.auth.usersfile import UsersFileError, add_user

    config = load_config(path)
    file = _users_file(config)
    if file is None:
        return 1, "this configuration uses [directory]; it has no [users] file"
    if not password:
        return 1, "refused: empty password"
    try:
        new = add_user(file, name, password, addresses, groups)
    except (ValueError, UsersFileError) as error:
        return 1, f"refused: {error}"
    except OSError as error:
        return 1, f"cannot write {file}: {error.strerror}"
    return 0, f"user {name} {'added to' if new else 'updated in'} {file}"


def user_delete(path: str | None, name: str) -> Result:
    """
    C{relaygw user delete}: remove a user from the C{[users].file}.

    @return: C{(0, "user NAME deleted from FILE")}, or C{(1, problem)} when
        the user is unknown or the file cannot be written.
    @raise ConfigError: the configuration is invalid.
    """
    from relaygw.auth.usersfile import UsersFileError, delete_user

    config = load_config(path)
    file = _users_file(config)
    if file is None:
        return 1, "this configuration uses [directory]; it has no [users] file"
    try:
        removed = delete_user(file, name)
    except UsersFileError as error:
        return 1, str(error)
    except OSError as error:
        return 1, f"cannot write {file}: {error.strerror}"
    if not removed:
        return 1, f"no user {name} in {file}"
    return 0, f"user {name} deleted from {file}"


def test_auth(
    path: str | None,
    name: str,
    password: str,
    reactor: IReactorFromThreads | None = None,
    threadpool: ThreadPool | None = None,
) -> Deferred[Result]:
    """
    C{relaygw test-auth}: check a password against the configured store
    (directory or users file), without throttling or caching.

    @param reactor: with C{threadpool}, where a directory runs its blocking
        calls; without them the users file is read inline.
    @return: a Deferred firing with C{(0, text)} listing the user's name,
        addresses, groups and effective rights on each connector, or C{(1,
        problem)} when the login fails or the directory does not answer.
    @raise ConfigError: the configuration is invalid.
    """
    config = load_config(path)
    return Deferred.fromCoroutine(_test_auth(config, name, password, reactor, threadpool))


async def _test_auth(
    config: Config,
    name: str,
    password: str,
    reactor: IReactorFromThreads | None,
    threadpool: ThreadPool | None,
) -> Result:
    from twisted.cred.error import UnauthorizedLogin
    from twisted.cred.portal import Portal
    from twisted.internet.task import Clock

    from relaygw.auth.checker import DirectoryChecker
    from relaygw.auth.realm import IAuthenticatedUser, UserRealm
    from relaygw.auth.sasl import Credentials
    from relaygw.auth.user import AuthenticatedUser
    from relaygw.interfaces import DirectoryUnavailable
    from relaygw.service import StartupError, build_directory
    from relaygw.session.rights import session_rights

    try:
        store = build_directory(config, reactor=reactor, threadpool=threadpool)
    except StartupError as error:
        return 1, str(error)
    # No cache here (ttl 0), so the checker's clock is never consulted for expiry.
    portal = Portal(UserRealm(), [DirectoryChecker(store, Clock())])
    credentials = Credentials(name.encode("utf-8", "surrogateescape"),
                              password.encode("utf-8", "surrogateescape"), "", "test-auth")
    try:
        _, user, _ = await portal.login(credentials, None, IAuthenticatedUser)
    except UnauthorizedLogin:
        return 1, f"authentication failed for {name}"
    except DirectoryUnavailable as error:
        return 1, f"directory unavailable: {error}"
    assert isinstance(user, AuthenticatedUser)
    lines = [
        f"authenticated: {user.name}",
        f"addresses: {', '.join(sorted(user.addresses)) or '(none)'}",
        f"groups: {'; '.join(sorted(user.groups)) or '(none)'}",
        "rights:",
    ]
    for connector in config.connectors:
        rights = ", ".join(sorted(session_rights(connector, user))) or "(none)"
        lines.append(f"  {connector.name}: {rights}")
    return 0, "\n".join(lines)

