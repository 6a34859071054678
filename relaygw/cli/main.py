"""
The C{relaygw} console script (SPEC section 6): argument parsing and output.
The commands themselves are in L{relaygw.cli.commands}.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

from relaygw.cli import commands
from relaygw.config._model import Binding
from relaygw.config._units import parse_binding
from relaygw.errors import ConfigError

__all__ = ["PasswordError", "main", "read_password", "run"]


class PasswordError(Exception):
    """No usable password was given (empty, or the two prompts differ)."""


def read_password(stdin: TextIO, *, confirm: bool) -> str:
    """
    The password: the first line of C{stdin} when it is not a terminal (line
    end removed), else a prompt without echo (twice when C{confirm}).

    @raise PasswordError: empty, or the two entries differ.
    """
    if not stdin.isatty():
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Password (again): ") != password:
            raise PasswordError("the passwords differ")
    if not password:
        raise PasswordError("empty password refused")
    return password


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
    user = sub.add_parser("user", help="manage the local users file",
                          description="manage the [users] file of a configuration")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    for action, text in (("add", "add or replace a user (password from stdin or a prompt)"),
                         ("delete", "delete a user")):
        command = user_sub.add_parser(action, help=text, description=text)
        command.add_argument("-c", "--config", metavar="PATH",
                             help="configuration file (default: the embedded default)")
        command.add_argument("name", metavar="NAME", help="the login name")
        if action == "add":
            command.add_argument("--address", action="append", default=[], metavar="ADDR",
                                 help="an address the user may send as (repeatable)")
            command.add_argument("--group", action="append", default=[], metavar="G",
                                 help="a group, matched by connector grants (repeatable)")
    test = with_config("test-auth", "check a password and show the user's rights")
    test.add_argument("user", metavar="USER", help="the login name")
    _queue_parser(sub)
    track = with_config("track", "search the message tracking log (like Get-MessageTrackingLog)")
    track.add_argument("--sender", metavar="S", help="envelope sender (* and ? are wildcards)")
    track.add_argument("--recipient", metavar="R", help="recipient (* and ? are wildcards)")
    track.add_argument("--message-id", metavar="M", help="the Message-ID header, <> optional")
    track.add_argument("--queue-id", metavar="ID", help="the queue id (InternalId)")
    track.add_argument("--connector", metavar="NAME", help="the receive connector")
    track.add_argument("--client-ip", metavar="IP", help="the client's address or a CIDR")
    track.add_argument("--event", action="append", default=[], metavar="EVENT",
                       help="RECEIVE, DELIVER, DEFER, FAIL, DSN or EXPIRE (repeatable)")
    track.add_argument("--since", metavar="WHEN",
                       help="a duration back from now (30m, 2h, 7d) or a UTC time")
    track.add_argument("--json", action="store_true", help="print JSON, every field")
    return parser


def _track(args: argparse.Namespace) -> tuple[int, str]:
    import time

    from relaygw.cli.track import Query, parse_since, track

    try:
        since = None if args.since is None else parse_since(args.since, time.time())
    except ValueError as error:
        return 1, f"relaygw track: {error}"
    query = Query(sender=args.sender, recipient=args.recipient, message_id=args.message_id,
                  queue_id=args.queue_id, connector=args.connector, client_ip=args.client_ip,
                  events=tuple(args.event), since=since)
    return track(args.config, query, as_json=args.json)


def _queue_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = "list, show, retry or delete queued messages (like mailq and postsuper)"
    queue = sub.add_parser("queue", help=text, description=text)
    # Also before the action; its own dest, or the action's default would override it.
    queue.add_argument("-c", "--config", dest="queue_config", metavar="PATH",
                       help="configuration file (default: the embedded default)")
    actions = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    for action, help in (
        ("list", "the queued messages and their pending recipients"),
        ("show", "one message's envelope and headers"),
        ("retry", "try a message (without ID: every message) at once"),
        ("delete", "remove a message from the queue, without a bounce"),
    ):
        command = actions.add_parser(action, help=help, description=help)
        command.add_argument("-c", "--config", metavar="PATH",
                             help="configuration file (default: the embedded default)")
        if action != "list":
            command.add_argument("queue_id", metavar="ID", nargs="?" if action == "retry" else None,
                                 help="the queue id (the InternalId of the 250 reply)")
        if action in ("retry", "delete"):
            command.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                                 help="how long to wait for a running delivery process"
                                      " to carry it out (default 5)")


def _queue(args: argparse.Namespace) -> tuple[int, str]:
    from relaygw.cli import queue

    config = args.config if args.config is not None else args.queue_config
    if args.queue_command == "list":
        return queue.queue_list(config)
    if args.queue_command == "show":
        return queue.queue_show(config, args.queue_id)
    if args.queue_command == "retry":
        return queue.queue_retry(config, args.queue_id, wait=args.wait)
    return queue.queue_delete(config, args.queue_id, wait=args.wait)


def _test_auth(config: str | None, user: str, password: str) -> tuple[int, str]:
    """Run L{commands.test_auth} on the global reactor (task.react), with a thread pool."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorFromThreads
    from twisted.python.threadpool import ThreadPool

    outcome: list[tuple[int, str]] = []

    async def go(reactor: IReactorFromThreads) -> None:
        pool = ThreadPool(minthreads=0, maxthreads=2, name="relaygw-test-auth")
        pool.start()
        try:
            outcome.append(await commands.test_auth(config, user, password, reactor, pool))
        finally:
            pool.stop()

    try:
        task.react(lambda r: Deferred.fromCoroutine(go(r)))
    except SystemExit:
        pass
    return outcome[0] if outcome else (1, "test-auth did not complete")


def run(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> int:
    """
    Run one command and print its output.

    @return: the exit status (argparse exits by itself, status 2, on bad usage).
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    inp = stdin if stdin is not None else sys.stdin
    args = _parser().parse_args(argv)
    try:
        if args.command in ("user", "test-auth"):
            adding = args.command == "user" and args.user_command == "add"
            if args.command == "user" and args.user_command == "delete":
                status, text = commands.user_delete(args.config, args.name)
            else:
                try:
                    password = read_password(inp, confirm=adding)
                except PasswordError as error:
                    print(error, file=err)
                    return 1
                if adding:
                    status, text = commands.user_add(args.config, args.name, password,
                                                     args.address, args.group)
                else:
                    commands.load_config(args.config)  # a bad configuration fails before react
                    status, text = _test_auth(args.config, args.user, password)
            print(text, file=out if status == 0 else err)
            return status
        if args.command in ("check-config", "queue", "track"):
            if args.command == "check-config":
                status, text = commands.check_config(args.config)
            elif args.command == "queue":
                status, text = _queue(args)
            else:
                status, text = _track(args)
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
