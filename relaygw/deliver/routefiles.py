"""
The files an outbound route names (C{ca_file}, C{auth_password_file}),
read when its target is built.  One that cannot be read is logged and read
again at the next delivery; until then the target sends nothing (never
without the configured trust or AUTH).
"""

from __future__ import annotations

from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.logger import Logger

from relaygw.config._model import Route
from relaygw.deliver._transaction import ClientAuth, ClientTLS, TLSOptionsFactory
from relaygw.deliver.tlspolicy import (
    load_ca_file,
    unverified_tls_options,
    verified_tls_options,
)

__all__ = ["RouteFiles"]


class RouteFiles:
    """
    The trust and credentials of one route.

    @ivar tls_options: server name -> TLS options, once read.
    @ivar verified: server name -> verifying TLS options, for a C{"mta-sts"}
        route's domains with an enforced policy.
    @ivar trust: the CAs of C{ca_file}; C{None} for the system store.
    @ivar auth: the credentials, when the route has C{auth_user} and they were read.
    """

    _log = Logger()

    def __init__(
        self, route: Route, tls: ClientTLS, tls_options: TLSOptionsFactory | None = None
    ) -> None:
        """
        @param tls_options: overrides what C{tls} and C{ca_file} give (tests).
        """
        self._route = route
        self._tls = tls
        self.tls_options = tls_options
        self.verified: TLSOptionsFactory | None = None
        self.trust: IOpenSSLTrustRoot | None = None
        self.auth: ClientAuth | None = None
        self._ready = self._read()

    def ready(self) -> bool:
        """Whether everything is read (tried again when it was not)."""
        if not self._ready:
            self._ready = self._read()
        return self._ready

    def _read(self) -> bool:
        route = self._route
        key, path = "ca_file", route.ca_file
        try:
            if route.ca_file is not None and self.trust is None:
                self.trust = load_ca_file(route.ca_file)
            if self.tls_options is None:
                self.tls_options = (
                    verified_tls_options(self.trust) if self._tls == "verify"
                    else unverified_tls_options
                )
            if route.tls == "mta-sts" and self.verified is None:
                self.verified = verified_tls_options(self.trust)
            # An xoauth2 route's credential is a token (its target's token source).
            if route.auth_user and route.auth == "password" and self.auth is None:
                key, path = "auth_password_file", route.auth_password_file
                assert path is not None  # the loader requires it with auth_user
                password = path.read_text(encoding="utf-8").rstrip("\r\n")
                self.auth = ClientAuth(route.auth_user, password)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            # Only the error's kind and the path are logged, never content.
            self._log.error(
                "Route {route}: cannot read {key} {path}: {error}",
                route=route.name,
                key=key,
                path=str(path),
                error=getattr(error, "strerror", None) or type(error).__name__,
            )
            return False
        return True
