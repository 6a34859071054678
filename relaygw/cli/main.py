"""
The C{relaygw} console script (SPEC section 6): argument parsing and output.
The commands themselves are in L{relaygw.cli.commands}.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from relaygw.cli import commands
from relaygw.config._model import Binding
from relaygw.config._units import parse_binding
from relaygw.errors import ConfigError

__all__ = ["main", "run"]


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _binding(text: str) -> Binding:
    try:
        return parse_binding(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaygw", description="relaygw SMTP relay gateway: administration commands"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help, description=help)
        command.add_argument(
            "-c",
            "--config",
            metavar="PATH",
            help="configuration file (default: the embedded default configuration)",
        )
        return command

    with_config("check-config", "validate the configuration")
    with_config("connectors", "list the receive connectors")
    which = with_config(
        "which-connector", "show which connector a connection would get, and whom it beat"
    )
    which.add_argument(
        "--local", required=True, type=_binding, metavar="ADDR:PORT",
        help="the address and port the client connects to, e.g. 127.0.0.1:2525 or [::1]:25",
    )
    which.add_argument(
        "--remote", required=True, type=_address, metavar="IP", help="the client's address"
    )
    return parser


def run(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    Run one command and print its output.

    @return: the exit status (argparse exits by itself, status 2, on bad usage).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            status, text = commands.check_config(args.config)
            print(text, file=out if status == 0 else err)
            return status
        if args.command == "connectors":
            status, text = commands.connectors(args.config)
        else:
            status, text = commands.which_connector(args.config, args.local, args.remote)
    except ConfigError as error:
        print(error, file=err)
        return 1
    print(text, file=out)
    return status


def main() -> NoReturn:
    """The console script entry point (C{relaygw = relaygw.cli.main:main})."""
    sys.exit(run())


if __name__ == "__main__":
    main()
