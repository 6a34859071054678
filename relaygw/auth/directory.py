"""
Active Directory and LDAP as an L{IDirectory}: search-then-bind logins,
nested groups, addresses, failover and timeouts (SPEC section 2, "Directory
defaults").  The only module that imports ldap3.

ldap3 is synchronous, so every call runs in the service's bounded thread
pool via L{deferToThreadPool}; the reactor never waits on a directory.

Choices, and why:
  - B{A fresh connection per operation} (ldap3's plain C{SYNC} strategy,
    never shared between threads) rather than one C{SAFE_SYNC} connection:
    nothing stale survives a directory restart, failover is simply "the next
    URL", and a user bind can never leave a shared connection bound as that
    user.  The cost, a TCP and TLS handshake per login, is what the
    checker's success cache is for.  Failover stops at the user bind: a
    bind sent without a verdict back is 454, never a second bind elsewhere
    (each would count against the AD lockout threshold).
  - B{The throttle's account gate} (L{IAccountGate}) is asked with the DN
    found, from the pool thread through C{blockingCallFromThread}, before
    the groups search and the bind: guesses spread over an account's login
    names count against the one account, and a throttled account is never
    bound.
  - B{Hard timeouts}: C{settings.timeout} bounds the TCP connect and every
    read, TLS handshake included (ldap3 sets the socket timeout before it
    wraps the socket); the read timeout is whole seconds (ldap3 packs it
    into C{SO_RCVTIMEO}), rounded up.
  - B{TLS}: one C{ssl.SSLContext} per directory (TLS 1.2 or newer,
    C{CERT_REQUIRED}, C{ca_file} or else the system CAs) with hostname (or
    IP) checking done by OpenSSL itself, used for C{ldaps://} and for StartTLS
    on C{ldap://} when C{start_tls}.  A certificate that does not verify is a
    failure of that server: failover, then L{DirectoryUnavailable} (454 4.7.0,
    never 535), with the TLS error in the log.
  - B{Login names}: empty passwords, empty names, NUL bytes and names over
    256 characters are refused without asking any server.  For AD a
    C{DOMAIN\\user} name is searched as C{user}: the NetBIOS domain part is
    dropped, not checked (one domain per C{[directory]}; the password still
    has to match).  The name is escaped for filter context before it
    replaces C{{user}} in C{user_filter}.
  - B{Passwords} are sent as UTF-8 bytes (ldap3 would SASLprep a C{str},
    which AD does not do) and never reach a log event, an exception message
    or a repr: errors around a bind keep only the exception's type name.
  - B{Locked-out AD accounts}: C{msDS-User-Account-Control-Computed} bit
    C{UF_LOCKOUT} when the server returns it, because C{lockoutTime} stays
    set after the lockout has expired; C{lockoutTime > 0} only when the
    computed attribute is absent.
  - B{Groups} are returned as DNs; CN grants match their first RDN
    (L{relaygw.session.rights.group_matches}).  AD: transitive, by the
    in-chain rule.  LDAP: C{memberOf}, else groups whose C{member} or
    C{uniqueMember} is the user, then nested groups up to 8 levels.  The
    AD primary group (C{primaryGroupID}, usually Domain Users) is not
    included: AD keeps it out of C{member}.
"""

from __future__ import annotations

import math
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from attrs import frozen
from ldap3 import Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import blockingCallFromThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relaygw.auth.user import AuthenticatedUser
from relaygw.config._model import Directory
from relaygw.interfaces import DirectoryUnavailable, IAccountGate, IDirectory

__all__ = ["LDAPDirectory", "MAX_NAME_LENGTH"]

_T = TypeVar("_T")

#: Longest login name or address sent to a directory.
MAX_NAME_LENGTH = 256

_UF_ACCOUNTDISABLE = 0x2
_UF_LOCKOUT = 0x10
_IN_CHAIN = "1.2.840.113556.1.4.1941"
_PAGED_RESULTS = "1.2.840.113556.1.4.319"
# inappropriateAuthentication, invalidCredentials, insufficientAccessRights,
# unwillingToPerform: the server's "no" to a user bind.
_BIND_REFUSED = frozenset({48, 49, 50, 53})
_PAGE_SIZE = 500
_MAX_PAGES = 20
_NEST_DEPTH = 8
_MAX_GROUPS = 5000
_CHUNK = 50
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+")
_AD_ACCOUNT = ("sAMAccountName", "userAccountControl", "lockoutTime",
               "msDS-User-Account-Control-Computed")  # fmt: skip


class _ServerFailed(Exception):
    """This server cannot answer now; the text is safe to log."""


class _BindUnanswered(_ServerFailed):
    """
    The user bind was sent but got no verdict (a timeout, a dropped
    connection, an unexpected result code).  Not retried on the next
    server: the first may have counted it as a bad password, and two
    counts for one AUTH would bring the account nearer its AD lockout.
    """


class _VerifyingTls(Tls):
    """
    ldap3's L{Tls} with our own context: ldap3 would switch OpenSSL's
    hostname check off and use the deprecated C{ssl.match_hostname}.
    """

    def __init__(self, context: ssl.SSLContext, hostname: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED)
        self._context = context
        self._hostname = hostname

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=do_handshake,
            server_hostname=self._hostname,
        )


@frozen
class _Endpoint:
    url: str
    host: str
    port: int
    ldaps: bool
    tls: _VerifyingTls


@implementer(IDirectory)
class LDAPDirectory:
    """
    An L{IDirectory} over ldap3 for C{kind = "active-directory"} or
    C{"ldap"}.
    """

    _log = Logger()

    def __init__(
        self,
        settings: Directory,
        *,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        bind_password: str,
    ) -> None:
        """
        @param settings: C{[directory]}, defaults filled in by the loader.
        @param threadpool: a bounded pool the service starts and stops.
        @param bind_password: the service account's password (from
            C{bind_password_file}).
        @raise ValueError: C{bind_dn} without a password (that would be an
            unauthenticated bind), an unreadable C{ca_file}, an unusable
            server URL or address attribute name.
        """
        if settings.bind_dn and not bind_password:
            raise ValueError("bind_dn is set but the bind password is empty")
        for attribute in settings.address_attributes:
            if not _ATTRIBUTE.fullmatch(attribute):
                raise ValueError(f"{attribute!r} is not an attribute name")
        self._settings = settings
        self._reactor = reactor
        self._pool = threadpool
        self._ad = settings.kind == "active-directory"
        self._bind_password = bind_password.encode("utf-8")
        self._connect_timeout = max(settings.timeout.total_seconds(), 0.1)
        self._read_timeout = max(1, math.ceil(settings.timeout.total_seconds()))
        try:
            context = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"ca_file {str(settings.ca_file)!r} cannot be used: {e}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._endpoints = tuple(_endpoint(url, context) for url in settings.servers)
        account = _AD_ACCOUNT if self._ad else ("uid", "memberOf")
        self._user_attributes = sorted({*account, *settings.address_attributes})

    def authenticate(
        self, username: str, password: str, gate: object | None = None
    ) -> Deferred[AuthenticatedUser]:
        """
        Search the user with the service account, ask C{gate} (an
        L{IAccountGate}) about the DN found, then bind as it.

        @return: fires with the L{AuthenticatedUser}; fails with
            L{UnauthorizedLogin} or L{DirectoryUnavailable}.
        """
        problem = _login_problem(username, password)
        if problem is not None:
            return self._refuse(UnauthorizedLogin(problem), username)
        try:
            secret = password.encode("utf-8")
        except UnicodeEncodeError:
            return self._refuse(UnauthorizedLogin("unencodable password"), username)
        checked = IAccountGate(gate, None)
        d = self._timed(self._run(self._authenticate, username, secret, checked), "authenticate")
        d.addErrback(self._refused, username)
        return d

    def has_address(self, address: str) -> Deferred[bool]:
        """
        @return: fires with whether some entry holds C{address} in one of the
            address attributes (C{proxyAddresses} as C{smtp:address}).
        """
        if not address or "\0" in address or len(address) > MAX_NAME_LENGTH:
            return succeed(False)
        return self._timed(self._run(self._has_address, address), "has_address")

    def check(self) -> Deferred[None]:
        """
        @return: fires when some server accepts the service-account bind.
            Failed servers are not logged one by one: the caller (the
            health check, every second) gets them all in the failure.
        """
        return self._run(self._with_server, lambda conn: None, False)

    # -- reactor thread ---------------------------------------------------

    def _run(self, f: Callable[..., _T], *args: object) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _timed(self, d: Deferred[_T], operation: str) -> Deferred[_T]:
        """Emit C{event="directory.request"} with the seconds C{d} took."""
        started = time.monotonic()

        def timed(result: object) -> object:
            # No format: an event for the metrics observer, not a log line.
            self._log.debug(event="directory.request", operation=operation,
                            seconds=time.monotonic() - started)
            return result

        d.addBoth(timed)
        return d

    def _refuse(self, error: UnauthorizedLogin, username: str) -> Deferred[AuthenticatedUser]:
        self._log_refusal(username, error)
        return fail(error)

    def _refused(self, failure: Failure, username: str) -> Failure:
        if isinstance(failure.value, UnauthorizedLogin):
            self._log_refusal(username, failure.value)
        return failure

    def _log_refusal(self, username: str, error: UnauthorizedLogin) -> None:
        self._log.info(
            "directory refused login {user}: {reason}", user=_shown(username), reason=str(error)
        )

    def _warn(self, url: str, problem: str) -> None:
        # Called in a pool thread: log from the reactor thread.
        self._reactor.callFromThread(
            self._log.warn,
            "directory server {server} failed: {problem}",
            server=url,
            problem=problem,
        )

    # -- pool threads -----------------------------------------------------

    def _with_server(self, op: Callable[[Connection], _T], warn: bool = True) -> _T:
        """
        Run C{op} on the first server that connects and answers (failover),
        logging each server that fails when C{warn}.
        """
        problems = []
        for endpoint in self._endpoints:
            conn = None
            try:
                conn = self._connect(endpoint)
                return op(conn)
            except _BindUnanswered as e:
                if warn:
                    self._warn(endpoint.url, str(e))
                raise DirectoryUnavailable(
                    f"{endpoint.url}: {e}; not retried on another server") from None
            except _ServerFailed as e:
                problem = str(e)
            except (LDAPException, OSError) as e:
                problem = _describe(e)
            finally:
                if conn is not None:
                    _close(conn)
            if warn:
                self._warn(endpoint.url, problem)
            problems.append(f"{endpoint.url}: {problem}")
        raise DirectoryUnavailable("no directory server answered (" + "; ".join(problems) + ")")

    def _connect(self, endpoint: _Endpoint) -> Connection:
        server = Server(
            endpoint.host,
            port=endpoint.port,
            use_ssl=endpoint.ldaps,
            tls=endpoint.tls,
            get_info="NO_INFO",
            connect_timeout=self._connect_timeout,
        )
        conn = Connection(
            server,
            auto_bind="NONE",
            client_strategy="SYNC",
            auto_referrals=False,
            check_names=False,
            read_only=True,
            raise_exceptions=False,
            receive_timeout=self._read_timeout,
            return_empty_attributes=False,
        )
        try:
            conn.open(read_server_info=False)
            if not endpoint.ldaps and self._settings.start_tls:
                if not conn.start_tls(read_server_info=False):
                    raise _ServerFailed(f"StartTLS refused: {_result(conn)}")
            if self._settings.bind_dn:
                if not _bind(conn, self._settings.bind_dn, self._bind_password):
                    raise _ServerFailed(f"service account bind refused: {_result(conn)}")
            elif not conn.bind(read_server_info=False):
                raise _ServerFailed(f"anonymous bind refused: {_result(conn)}")
        except BaseException:
            _close(conn)
            raise
        return conn

    def _authenticate(
        self, username: str, password: bytes, gate: IAccountGate | None
    ) -> AuthenticatedUser:
        name = username
        if self._ad and "\\" in name:
            name = name.split("\\", 1)[1]
            if not name:
                raise UnauthorizedLogin("no user name after the domain")
        search = self._settings.user_filter.replace("{user}", escape_filter_chars(name))

        def login(conn: Connection) -> AuthenticatedUser:
            found = _search(conn, self._settings.base_dn, search, self._user_attributes, limit=2)
            if not found:
                raise UnauthorizedLogin("unknown user")
            if len(found) > 1:
                raise UnauthorizedLogin("login name matches more than one entry")
            dn, attributes = found[0]
            if self._ad:
                _refuse_disabled_or_locked(attributes)
            # Before any bind: an account the throttle holds is never asked.
            if gate is not None and not blockingCallFromThread(self._reactor, gate.admit, dn):
                raise UnauthorizedLogin("account throttled")
            groups = self._groups(conn, dn, attributes)
            try:
                bound = _bind(conn, dn, password)
            except _ServerFailed as e:
                raise _BindUnanswered(f"user {e}") from None
            except OSError as e:
                raise _BindUnanswered(f"user bind failed ({type(e).__name__})") from None
            if not bound:
                code = conn.result.get("result") if conn.result else None
                if code in _BIND_REFUSED:
                    raise UnauthorizedLogin(f"bind refused: {_result(conn)}")
                raise _BindUnanswered(f"user bind failed: {_result(conn)}")
            canonical = _first(attributes, "samaccountname" if self._ad else "uid") or name
            return AuthenticatedUser(canonical, self._addresses(attributes), groups)

        return self._with_server(login)

    def _addresses(self, attributes: Mapping[str, list[str]]) -> frozenset[str]:
        found = set()
        for attribute in self._settings.address_attributes:
            for value in attributes.get(attribute.lower(), []):
                if attribute.lower() == "proxyaddresses":
                    kind, colon, value = value.partition(":")
                    if not colon or kind.lower() != "smtp":
                        continue
                if value.strip():
                    found.add(value.strip().lower())
        return frozenset(found)

    def _groups(
        self, conn: Connection, dn: str, attributes: Mapping[str, list[str]]
    ) -> frozenset[str]:
        base = self._settings.base_dn
        if self._ad:
            chain = f"(&(objectClass=group)(member:{_IN_CHAIN}:={escape_filter_chars(dn)}))"
            return frozenset(g for g, _ in _search(conn, base, chain, ["1.1"], paged=True))
        groups = {g.lower(): g for g in attributes.get("memberof", [])}
        frontier = list(groups.values()) if groups else [dn]
        for _ in range(_NEST_DEPTH):
            fresh = {}
            for chunk in _chunks(frontier, _CHUNK):
                members = "".join(
                    f"(member={v})(uniqueMember={v})" for v in map(escape_filter_chars, chunk)
                )
                query = (
                    "(&(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"
                    f"(|{members}))"
                )
                for g, _ in _search(conn, base, query, ["1.1"], paged=True):
                    if g.lower() not in groups:
                        fresh[g.lower()] = g
            groups.update(fresh)
            frontier = list(fresh.values())
            if not frontier or len(groups) >= _MAX_GROUPS:
                break
        return frozenset(groups.values())

    def _has_address(self, address: str) -> bool:
        value = escape_filter_chars(address)
        terms = "".join(
            f"(proxyAddresses=smtp:{value})" if a.lower() == "proxyaddresses" else f"({a}={value})"
            for a in self._settings.address_attributes
        )
        query = f"(|{terms})"
        base = self._settings.base_dn
        return self._with_server(lambda conn: bool(_search(conn, base, query, ["1.1"], limit=1)))


def _endpoint(url: str, context: ssl.SSLContext) -> _Endpoint:
    parts = urlsplit(url)
    ldaps = parts.scheme.lower() == "ldaps"
    if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
        raise ValueError(f"{url!r} is not an ldap:// or ldaps:// URL")
    host = parts.hostname
    return _Endpoint(url, host, parts.port or (636 if ldaps else 389), ldaps,
                     _VerifyingTls(context, host))  # fmt: skip


def _login_problem(username: str, password: str) -> str | None:
    """Why a login is refused before any server is asked, or C{None}."""
    if not password:
        # RFC 4513 5.1.2: a DN with an empty password is an unauthenticated
        # bind, which many servers answer with success.
        return "empty password"
    if not username:
        return "empty user name"
    if len(username) > MAX_NAME_LENGTH:
        return f"user name longer than {MAX_NAME_LENGTH} characters"
    if "\0" in username or "\0" in password:
        return "NUL in user name or password"
    return None


def _bind(conn: Connection, dn: str, password: bytes) -> bool:
    """A simple bind; raises L{_ServerFailed} with a password-free text."""
    try:
        return bool(conn.rebind(user=dn, password=password, read_server_info=False))
    except LDAPException as e:
        # Only the type: nothing derived from the request leaves this frame.
        raise _ServerFailed(f"bind failed ({type(e).__name__})") from None


def _search(
    conn: Connection,
    base: str,
    query: str,
    attributes: list[str],
    *,
    limit: int = 0,
    paged: bool = False,
) -> list[tuple[str, dict[str, list[str]]]]:
    """Entries (DN, lower-cased attribute name -> values); referrals dropped."""
    found: list[tuple[str, dict[str, list[str]]]] = []
    cookie: str | bytes | None = None
    for _ in range(_MAX_PAGES):
        conn.search(
            base,
            query,
            search_scope="SUBTREE",
            dereference_aliases="NEVER",
            attributes=attributes,
            size_limit=limit,
            paged_size=_PAGE_SIZE if paged else None,
            paged_cookie=cookie,
        )
        result = conn.result or {}
        code = result.get("result")
        if code == 32:  # noSuchObject: the base DN does not exist
            return found
        if code not in (0, 4):  # success, sizeLimitExceeded
            raise _ServerFailed(f"search failed: {_result(conn)}")
        for item in conn.response or []:
            if item.get("type") == "searchResEntry":
                found.append((str(item["dn"]), _normalised(item.get("attributes", {}))))
        controls = result.get("controls") or {}
        cookie = controls.get(_PAGED_RESULTS, {}).get("value", {}).get("cookie")
        if not paged or not cookie or len(found) >= _MAX_GROUPS:
            break
    return found


def _normalised(attributes: Mapping[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, raw in attributes.items():
        values = raw if isinstance(raw, list) else [raw]
        out[str(key).lower()] = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values
        ]
    return out


def _first(attributes: Mapping[str, list[str]], name: str) -> str | None:
    values = attributes.get(name)
    return values[0] if values else None


def _integer(attributes: Mapping[str, list[str]], name: str) -> int | None:
    value = _first(attributes, name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _refuse_disabled_or_locked(attributes: Mapping[str, list[str]]) -> None:
    if (_integer(attributes, "useraccountcontrol") or 0) & _UF_ACCOUNTDISABLE:
        raise UnauthorizedLogin("account disabled")
    computed = _integer(attributes, "msds-user-account-control-computed")
    if computed is not None:
        locked = bool(computed & _UF_LOCKOUT)
    else:
        locked = (_integer(attributes, "lockouttime") or 0) > 0
    if locked:
        raise UnauthorizedLogin("account locked out")


def _result(conn: Connection) -> str:
    result = conn.result or {}
    message = str(result.get("message") or "")[:160]
    text = f"{result.get('result')} {result.get('description')}"
    return f"{text} ({message})" if message else text


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _close(conn: Connection) -> None:
    try:
        conn.unbind()
    except (LDAPException, OSError):
        pass


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _shown(username: str) -> str:
    """A user name as logged: bounded, whatever the client sent."""
    return username if len(username) <= 64 else f"{username[:64]}...({len(username)} chars)"
