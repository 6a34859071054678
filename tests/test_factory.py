"""
Tests for L{relaygw.session.factory.SessionFactory}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from relaygw.config._model import Connector
from relaygw.connectors.selector import ConnectorSelector
from relaygw.session.protocol import Session
from tests.fakes import Harness, make_config, make_connector, reply_lines


class SessionFactoryTests(SynchronousTestCase):
    def test_builds_sessions_with_distinct_ids(self) -> None:
        """Each connection gets its own Session with its own session id."""
        harness = Harness()
        a = harness.factory.buildProtocol(None)
        b = harness.factory.buildProtocol(None)
        self.assertIsInstance(a, Session)
        self.assertNotEqual(a.session_id, b.session_id)

    def test_reconfigure_affects_new_sessions_only(self) -> None:
        """After reconfigure, new sessions use the new connectors; older ones keep theirs."""
        harness = Harness(make_connector(banner="old"))
        before, transport = harness.connect()
        new = make_config(make_connector(banner="new"))
        harness.factory.reconfigure(new, ConnectorSelector(new.connectors))
        _, fresh = harness.connect()
        self.assertEqual(reply_lines(fresh.value()), ["220 new"])
        before.dataReceived(b"QUIT\r\n")
        self.assertEqual(before.connector.banner, "old")  # type: ignore[union-attr]

    def test_counter_kept_while_limits_stay(self) -> None:
        """Connections opened before a reconfigure still count when the limits are unchanged."""
        harness = Harness(make_connector(max_connections_per_ip=1))
        harness.connect()
        new = make_config(make_connector(max_connections_per_ip=1, banner="x"))
        harness.factory.reconfigure(new, ConnectorSelector(new.connectors))
        _, transport = harness.connect()
        self.assertEqual(reply_lines(transport.value()), ["421 4.3.2 Service not available"])

    def test_counter_replaced_when_limits_change(self) -> None:
        """New limits take effect with a fresh counter."""
        harness = Harness(make_connector(max_connections_per_ip=1))
        harness.connect()
        new = make_config(make_connector(max_connections_per_ip=5))
        harness.factory.reconfigure(new, ConnectorSelector(new.connectors))
        _, transport = harness.connect()
        self.assertEqual(reply_lines(transport.value())[0][:4], "220 ")

    def test_rate_limiter_per_connector(self) -> None:
        """The same connector gets the same rate limiter; another connector its own."""
        harness = Harness()
        c1, c2 = make_connector(), make_connector(name="Other")
        self.assertIs(harness.factory.rate_limiter(c1), harness.factory.rate_limiter(c1))
        self.assertIsNot(harness.factory.rate_limiter(c1), harness.factory.rate_limiter(c2))

    def test_tls_options_cached(self) -> None:
        """TLS options are built once per connector until the next reconfigure."""
        calls: list[Connector] = []

        def options(connector: Connector) -> object:
            calls.append(connector)
            return "opts"

        harness = Harness(tls_options=options)
        connector = harness.config.connectors[0]
        self.assertEqual(harness.factory.tls_options(connector), "opts")
        self.assertEqual(harness.factory.tls_options(connector), "opts")
        self.assertEqual(len(calls), 1)
        harness.factory.reconfigure(harness.config, ConnectorSelector(harness.config.connectors))
        harness.factory.tls_options(connector)
        self.assertEqual(len(calls), 2)

    def test_tls_options_failure_is_no_tls(self) -> None:
        """A connector whose TLS options cannot be built has no TLS, and the error is logged."""

        def broken(connector: Connector) -> object:
            raise ValueError("bad PEM")

        harness = Harness(tls_options=broken)
        self.assertIsNone(harness.factory.tls_options(harness.config.connectors[0]))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_no_tls_options(self) -> None:
        """Without a tls_options callable no connector has TLS."""
        harness = Harness()
        self.assertIsNone(harness.factory.tls_options(harness.config.connectors[0]))
