"""
The C{relaygw} subcommands as plain functions returning C{(exit status,
text)}, so tests call them directly; L{relaygw.cli.main} parses arguments
and prints.

A configuration that does not load raises L{ConfigError} (except in
L{check_config}, whose job is to report it).
"""

from __future__ import annotations

from collections.abc import Sequence

from relaygw.config._load import load, load_default
from relaygw.config._model import Binding, Config
from relaygw.errors import ConfigError

__all__ = ["check_config", "connectors", "load_config", "which_connector"]

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
