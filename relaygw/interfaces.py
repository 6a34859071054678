"""
relaygw's own seams.  Twisted's contracts are reused where they exist
(ICredentialsChecker, IRealm, IResolver, IService); these are only for
relaygw's own seams.  Each docstring is the contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class IConnectorSelector(Interface):
    """
    Chooses the receive connector for a connection (SPEC section 2,
    "Choosing the receive connector").  Pure: no I/O, no Twisted.
    """

    def select(local_host: str, local_port: int, remote_ip: str) -> object:
        """
        @param local_host: the local address the connection arrived at, as
            C{transport.getHost().host} gives it (IPv4-mapped IPv6 allowed).
        @param local_port: the local port.
        @param remote_ip: the client's address (IPv4-mapped IPv6 allowed; it
            is matched as IPv4).
        @return: a L{relaygw.connectors.selector.Selection} (the winner, its
            matching range and the candidates it beat), or C{None} when no
            enabled connector on that binding has a range holding the client.
        """


class IMessageWriter(Interface):
    """
    One message being received into the spool.  Obtained from
    L{ISpool.begin}; exactly one of L{commit} or L{abort} ends it.
    """

    queue_id = Attribute("The internal queue id reserved for this message (str).")
    size = Attribute("Octets written so far (int).")

    def write(data: bytes) -> None:
        """
        Append C{data} to the message (synchronously; at most a bounded
        amount is held in memory, the rest goes to the entry's file).

        @raise OSError: the spool cannot take it; the caller answers 452 4.3.1
            and calls L{abort}.
        """

    def commit(envelope: object) -> Deferred[None]:
        """
        Make the message durable, off the reactor thread: write the rest of
        the data and the L{relaygw.spool.envelope.Envelope} (its C{id} is
        L{queue_id}) to the entry's temporary file, fsync it, rename it into
        place (the commit marker), fsync the directory.  Then the spool's
        subscribers are told (L{ISpool.subscribe}) and the Deferred fires.
        Only after it has fired may the client get 250.  The commit completes
        even if nobody waits for it any more (the client went away).

        @return: a Deferred firing with C{None} once the entry is durable, or
            failing with the L{OSError} that stopped it: then nothing was
            committed and the entry's file is removed.
        @raise ValueError: the writer is closed, or the envelope is not this
            writer's.
        """

    def abort() -> None:
        """
        Remove whatever was written.  Idempotent; never raises; does nothing
        once L{commit} was called.
        """


class ISpool(Interface):
    """
    The durable queue between the receive side and the send side.

    A committed entry holds the message data and its envelope; it appears
    (atomically) only once both are durable, so whatever a crash leaves of
    an entry being written is partial and is removed by L{recover}.  The
    delivery side's L{update}s supersede the envelope it was committed
    with.
    """

    def begin() -> IMessageWriter:
        """
        Reserve a new queue id for a message (its file may be created
        only later, by L{IMessageWriter.write} or L{IMessageWriter.commit}).

        @raise OSError: the spool cannot take messages.
        """

    def recover() -> list[object]:
        """
        Remove partial entries and temporary files left by a crash; return
        the envelopes of all committed entries, oldest first.  Called once at
        start, before anything is received or delivered.
        """

    def entries() -> list[object]:
        """
        The envelopes of the committed entries, oldest first, changing
        nothing (safe while another process receives into the spool).
        """

    def clean() -> int:
        """
        What L{recover} does, keeping no envelope in memory.

        @return: the number of committed entries.
        """

    def iter_entries() -> Iterator[object]:
        """
        The envelopes of the committed entries one at a time, in no order,
        changing nothing: a listing in constant memory.
        """

    def load(queue_id: str) -> object:
        """
        @return: the L{relaygw.spool.envelope.Envelope} of a committed entry.
        @raise KeyError: no such entry.
        """

    def open_data(queue_id: str) -> object:
        """
        @return: a new seekable binary file object (C{typing.BinaryIO}) that
            reads the message data of a committed entry from its start and
            ends where the data ends; the caller closes it.
        @raise KeyError: no such entry.
        @raise ValueError: the entry is damaged.
        @raise OSError: it cannot be read.
        """

    def update(envelope: object) -> None:
        """
        Atomically replace an entry's envelope (temp file, fsync, rename,
        directory fsync), synchronously; L{load} returns it from then on.

        @raise KeyError: no such entry.
        """

    def remove(queue_id: str) -> None:
        """Delete an entry (its data, envelope and updates).  Idempotent."""

    def subscribe(callback: object) -> None:
        """
        Call C{callback(envelope)} after every commit is durable, on the
        reactor thread, before the commit's Deferred fires.  The callback
        must not raise.
        """


class IRouter(Interface):
    """Recipient to route name.  Pure."""

    def route(address: str) -> str:
        """
        @param address: a recipient address (local@domain).
        @return: the route name: the accepted domain's route, else the
            gateway's C{default_route}.
        @raise LookupError: no route applies (no accepted domain and no default).
        """


class IDeliveryTarget(Interface):
    """
    Delivers one message to some recipients over one route: one transaction
    per destination.  Never raises: every failure becomes an outcome.
    """

    def deliver(envelope: object, recipients: object, open_data: object) -> object:
        """
        @param envelope: the L{relaygw.spool.envelope.Envelope}.
        @param recipients: the addresses (a sequence of str) to deliver now,
            all routed to this target.
        @param open_data: a callable taking no arguments that opens the
            message data, as often as the target needs it: it returns a new
            seekable binary file object (C{typing.BinaryIO}) reading the data
            from its start to its end, which the target closes; it raises
            what L{ISpool.open_data} raises (L{OSError}, L{KeyError},
            L{ValueError}) when the data cannot be had.
        @return: a L{twisted.internet.defer.Deferred} firing with a dict
            mapping each address in C{recipients} to an
            L{relaygw.spool.envelope.Outcome}.
        """


class IDirectory(Interface):
    """
    A credential and address store: Active Directory / LDAP (ldap3, in a
    thread pool) or the local users file.  Implementations never block the
    reactor and never put a password in a log event or an exception message.
    """

    def authenticate(username: str, password: str, gate: object | None = None) -> object:
        """
        Check a login.  The caller has already refused empty passwords, but
        implementations refuse them too, before any bind.  A directory where
        several login names mean one account (AD: sAMAccountName, UPN,
        C{DOMAIN\\user}, mail) asks C{gate}, an L{IAccountGate}, once it has
        found the account and before it binds as it.

        @return: a L{twisted.internet.defer.Deferred} firing with the
            L{relaygw.auth.user.AuthenticatedUser} (canonical name, addresses,
            groups, nested groups resolved).
        @raise twisted.cred.error.UnauthorizedLogin: (as the Deferred's
            failure) unknown user, wrong password, disabled or locked account.
        @raise relaygw.interfaces.DirectoryUnavailable: (as the Deferred's
            failure) no server answered within the timeout.
        """

    def has_address(address: str) -> object:
        """
        @return: a Deferred firing with C{True} when some user or group holds
            C{address} (AD: mail or proxyAddresses; LDAP: mail; users file:
            listed addresses), else C{False}; fails with
            L{DirectoryUnavailable} when no server answers.
        """

    def check() -> object:
        """
        @return: a Deferred firing with C{None} when the directory answers
            (a service-account bind), failing with L{DirectoryUnavailable}.
        """


class IAccountGate(Interface):
    """
    The AUTH throttle's say on one login, once the directory knows which
    account the login name means: failures are counted per account too, so
    guesses spread over an account's login names (AD: C{alice},
    C{EXAMPLE\\alice}, C{alice@corp}, its mail address) cannot lock it.
    """

    def admit(account: str) -> bool | Deferred[bool]:
        """
        Called on the reactor thread (a directory in a thread pool uses
        C{blockingCallFromThread}, which waits for a Deferred) after the
        account was found and before any bind as it; asking again for the
        same account (a failover) gives the same answer and counts once.

        @param account: the account's stable identity (its DN).
        @return: C{False}, or a Deferred firing with it (a receiving worker
            asks the gateway process): do not bind; refuse the login with
            L{twisted.cred.error.UnauthorizedLogin} (the gate knows why).
        """


class IProtocolLog(Interface):
    """
    An Exchange protocol log (SPEC section 5): SmtpReceive or SmtpSend.
    The pipeline asks for one handle per SMTP session and only when the
    connector (or route) says C{protocol_logging = "verbose"}; everything
    else (files, formatting, rotation) is the implementation's, off the
    reactor thread.
    """

    def session(
        connector: str, session_id: str | None, local: tuple[str, int], remote: tuple[str, int]
    ) -> IProtocolLogSession:
        """
        A handle for one session's rows.

        @param connector: the connector (receive) or route (send) name.
        @param session_id: the session's id, or C{None} to have one made.
        @param local: the local address and port.
        @param remote: the peer's address and port.
        """


class IProtocolLogSession(Interface):
    """
    The rows of one session.  L{row} is called on the reactor thread and
    is cheap: it queues, it never formats or writes, and it never raises.
    """

    session_id = Attribute("The session id its rows carry (str).")

    def row(event: str, data: bytes | str = b"", context: str = "") -> None:
        """
        Queue one row.  A multi-line C{data} (a multi-line reply) becomes one
        row per line.  Callers never pass secrets: AUTH payloads are masked
        before they get here, and message data is never passed.

        @param event: C{+} connect, C{-} disconnect, C{<} received,
            C{>} sent, C{*} information.
        """


class DirectoryUnavailable(Exception):
    """No directory server answered; the client gets 454 4.7.0 (never 535)."""


class TokenUnavailable(Exception):
    """
    No access token now (the token endpoint unreachable, slow, or refusing):
    a temporary failure, the messages wait in the queue (issue 9).  The
    message never holds the client secret or a token.
    """


class ITokenSource(Interface):
    """
    OAuth 2.0 access tokens for one upstream (Microsoft 365: the client
    credentials grant against Entra ID's token endpoint), cached until
    shortly before they expire.
    """

    def token() -> Deferred[str]:
        """
        A valid access token (the cached one, or a new one fetched once for
        all concurrent callers).

        @return: fails with L{TokenUnavailable} when none can be had now.
        """

    def invalidate(token: str) -> None:
        """
        The upstream refused C{token} (HTTP 401, SMTP 535): the next
        L{token} call fetches a new one (unless it was already replaced).
        """
