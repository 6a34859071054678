"""
MX delivery (relaygw.deliver.mx) against a real dnsmasq resolver and real
smtp-sink exchangers on loopback addresses (127.0.0.31-36, one port for all,
as the route's C{port} applies to every exchanger).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.trial.unittest import TestCase

from relaygw.config._model import DNS, HostPort, Route
from relaygw.deliver import outcome
from relaygw.deliver.mx import (
    Exchangers,
    MXTarget,
    ip_literal,
    lookup_addresses,
    lookup_exchangers,
    make_resolver,
)
from relaygw.deliver.smtpclient import ClientTimeouts
from relaygw.spool.envelope import Outcome
from tests.servers.dnsmasq import DNSMASQ_MISSING, Dnsmasq, dnsmasq_missing
from tests.servers.ports import free_port
from tests.servers.sink import SINK_MISSING, SmtpSink, sink_missing
from tests.test_targets import _envelope

pytestmark = pytest.mark.skipif(dnsmasq_missing(), reason=DNSMASQ_MISSING)

BODY = b"Subject: mx\r\n\r\nhello\r\n"


def test_ip_literal() -> None:
    assert ip_literal("[192.0.2.1]") == "192.0.2.1"
    assert ip_literal("[IPv6:2001:DB8::1]") == "2001:db8::1"
    assert ip_literal("[example.test]") is None
    assert ip_literal("example.test") is None


class _DNSCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="relaygw-mx-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.dns = Dnsmasq(self.tmp / "dns").start()
        self.addCleanup(self.dns.stop)
        # One try of one second: the timeout.test queries end quickly.
        self.resolver = make_resolver(
            DNS(servers=(HostPort("127.0.0.1", self.dns.port),)), reactor, timeout=(1,)
        )


class LookupTests(_DNSCase):
    async def test_preference_order_and_shuffle(self) -> None:
        """Exchangers by preference; only hosts of equal preference are shuffled."""
        found = await lookup_exchangers(self.resolver, "multi.test", shuffle=list.reverse)
        self.assertEqual(found, Exchangers(("mx2.multi.test", "mx1.multi.test", "mx3.multi.test")))
        found = await lookup_exchangers(self.resolver, "multi.test", shuffle=lambda hosts: None)
        self.assertEqual(found, Exchangers(("mx1.multi.test", "mx2.multi.test", "mx3.multi.test")))

    async def test_no_mx_is_the_implicit_exchanger(self) -> None:
        found = await lookup_exchangers(self.resolver, "aonly.test")
        self.assertEqual(found, Exchangers(("aonly.test",), implicit=True))

    async def test_null_mx_is_permanent(self) -> None:
        found = await lookup_exchangers(self.resolver, "nullmx.test")
        assert isinstance(found, Outcome)
        self.assertEqual((found.kind, found.reply.split()[1]), ("bounce", "5.1.10"))

    async def test_nxdomain_is_permanent(self) -> None:
        found = await lookup_exchangers(self.resolver, "nothing.test")
        assert isinstance(found, Outcome)
        self.assertEqual((found.kind, found.reply.split()[1]), ("bounce", "5.1.2"))

    async def test_timeout_and_refused_are_temporary(self) -> None:
        for domain in ("timeout.test", "outside.example"):
            found = await lookup_exchangers(self.resolver, domain)
            assert isinstance(found, Outcome)
            self.assertEqual((found.kind, found.reply), ("retry", str(outcome.DNS_TEMPFAIL)))

    async def test_addresses(self) -> None:
        self.assertEqual(await lookup_addresses(self.resolver, "mx1.multi.test"), ["127.0.0.31"])
        self.assertEqual(await lookup_addresses(self.resolver, "dual.test"), ["127.0.0.36", "::1"])
        self.assertEqual(await lookup_addresses(self.resolver, "nowhere.badmx.test"), [])


@pytest.mark.skipif(sink_missing(), reason=SINK_MISSING)
class MXTargetTests(_DNSCase):
    def setUp(self) -> None:
        super().setUp()
        self.data = self.tmp / "Q1.msg"
        self.data.write_bytes(BODY)
        self.port = free_port("127.0.0.31")
        self.sinks: dict[str, SmtpSink] = {}

    def sink(self, last_octet: int, *options: str) -> SmtpSink:
        host = f"127.0.0.{last_octet}"
        sink = SmtpSink(self.tmp / host, self.port, host=host, dump=True, options=options)
        sink.start()
        self.addCleanup(sink.stop)
        self.sinks[host] = sink
        return sink

    def deliver(self, *rcpts: str, ip_literals: bool = False) -> Any:
        route = Route("internet", via="mx", port=self.port, ip_literals=ip_literals)
        target = MXTarget(
            route,
            reactor=self.reactor,
            resolver=self.resolver,
            helo="gw.example.test",
            timeouts=ClientTimeouts(connect=3, reply=5, data_done=5),
            shuffle=lambda hosts: None,
        )
        return target.deliver(_envelope(*rcpts), list(rcpts), lambda: open(self.data, "rb"))

    def assert_received(self, sink: SmtpSink, *rcpts: str) -> None:
        [message] = sink.messages()
        self.assertEqual(_rcpts(message), list(rcpts))
        self.assertIn(BODY.replace(b"\r\n", b"\n"), message)

    async def test_best_exchanger_takes_all_recipients_in_one_transaction(self) -> None:
        best = self.sink(31)
        other = self.sink(32)
        result = await self.deliver("a@multi.test", "b@MULTI.test")
        self.assertEqual({o.kind for o in result.values()}, {"delivered"})
        self.assertEqual(result["a@multi.test"].remote_host, f"127.0.0.31:{self.port}")
        self.assert_received(best, "a@multi.test", "b@MULTI.test")
        self.assertEqual(other.messages(), [])

    async def test_failover_when_the_first_exchanger_is_down(self) -> None:
        second = self.sink(32)  # nothing listens on 127.0.0.31
        result = await self.deliver("a@multi.test")
        self.assertEqual(result["a@multi.test"].kind, "delivered")
        self.assertEqual(result["a@multi.test"].remote_host, f"127.0.0.32:{self.port}")
        self.assert_received(second, "a@multi.test")

    async def test_failover_on_4xx_to_mail(self) -> None:
        self.sink(31, "-r", "MAIL")
        self.sink(32, "-r", "MAIL")
        third = self.sink(33)
        result = await self.deliver("a@multi.test")
        self.assertEqual(result["a@multi.test"].remote_host, f"127.0.0.33:{self.port}")
        self.assert_received(third, "a@multi.test")

    async def test_rcpt_5xx_is_the_exchangers_verdict(self) -> None:
        self.sink(31, "-f", "RCPT")
        untouched = self.sink(32)
        result = await self.deliver("a@multi.test")
        self.assertEqual(result["a@multi.test"].kind, "bounce")
        self.assertEqual(untouched.messages(), [])

    async def test_all_exchangers_down_is_retried(self) -> None:
        result = await self.deliver("a@multi.test")
        self.assertEqual(result["a@multi.test"].kind, "retry")

    async def test_a_record_fallback(self) -> None:
        sink = self.sink(34)
        result = await self.deliver("a@aonly.test")
        self.assertEqual(result["a@aonly.test"].kind, "delivered")
        self.assert_received(sink, "a@aonly.test")

    async def test_domains_of_one_message_go_their_own_ways(self) -> None:
        mx1 = self.sink(31)
        aonly = self.sink(34)
        result = await self.deliver("a@multi.test", "b@aonly.test", "c@nullmx.test")
        self.assertEqual(
            {r: o.kind for r, o in result.items()},
            {"a@multi.test": "delivered", "b@aonly.test": "delivered", "c@nullmx.test": "bounce"},
        )
        self.assert_received(mx1, "a@multi.test")
        self.assert_received(aonly, "b@aonly.test")

    async def test_permanent_dns_answers_bounce_without_connecting(self) -> None:
        result = await self.deliver("a@nullmx.test", "b@nothing.test", "c@empty.test")
        self.assertEqual(
            {r: o.reply.split()[1] for r, o in result.items()},
            {"a@nullmx.test": "5.1.10", "b@nothing.test": "5.1.2", "c@empty.test": "5.4.4"},
        )
        self.assertEqual({o.kind for o in result.values()}, {"bounce"})

    async def test_temporary_dns_trouble_is_retried(self) -> None:
        result = await self.deliver("a@timeout.test", "b@badmx.test")
        self.assertEqual(result["a@timeout.test"].reply, str(outcome.DNS_TEMPFAIL))
        self.assertEqual(result["b@badmx.test"].reply, str(outcome.NO_EXCHANGER_ADDRESS))
        self.assertEqual({o.kind for o in result.values()}, {"retry"})

    async def test_ip_literal_only_where_the_route_allows_it(self) -> None:
        sink = self.sink(35)
        refused = await self.deliver("a@[127.0.0.35]")
        self.assertEqual(refused["a@[127.0.0.35]"].reply, str(outcome.IP_LITERAL_REFUSED))
        self.assertEqual(sink.messages(), [])
        allowed = await self.deliver("a@[127.0.0.35]", ip_literals=True)
        self.assertEqual(allowed["a@[127.0.0.35]"].kind, "delivered")
        self.assert_received(sink, "a@[127.0.0.35]")


def _rcpts(dumped: bytes) -> list[str]:
    """The recipients smtp-sink recorded (its C{X-Rcpt-Args:} lines)."""
    return [
        line.split(b":", 1)[1].strip().decode().strip("<>")
        for line in dumped.splitlines()
        if line.startswith(b"X-Rcpt-Args:")
    ]


STS_POLICY = "version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"


class MTASTSTests(TestCase):
    """
    tls = "mta-sts": multi.test publishes a policy (TXT in dnsmasq, the file on
    a local HTTPS server); its exchangers are recording servers offering
    STARTTLS with certificates from a test CA.
    """

    timeout = 30

    def setUp(self) -> None:
        from twisted.internet import reactor

        from relaygw.deliver.mtasts import PolicyFetcher
        from relaygw.deliver.tlspolicy import load_ca_file
        from tests.servers.https import HTTPSServer, Reply
        from tests.servers.recording_smtp import RecordingServer, TestCA

        self.reactor: Any = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="relaygw-mx-sts-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.dns = Dnsmasq(self.tmp / "dns", extra=(
            ("txt-record", "_mta-sts.multi.test,v=STSv1; id=sts1"),
            ("host-record", "mta-sts.multi.test,127.0.0.41"),
        )).start()
        self.addCleanup(self.dns.stop)
        self.resolver = make_resolver(
            DNS(servers=(HostPort("127.0.0.1", self.dns.port),)), reactor, timeout=(1,)
        )
        self.ca = TestCA(self.tmp)
        https_port = free_port("127.0.0.41")
        self.https = HTTPSServer(reactor, self.ca.issue("mta-sts.multi.test", ["mta-sts.multi.test"]),
                                 "127.0.0.41", https_port)
        self.https.start()
        self.addCleanup(self.https.stop)
        self.Reply = Reply
        self.port = free_port("127.0.0.31")
        self.servers = {}
        for n, name in ((31, "mx1.multi.test"), (32, "wrong.example")):
            server = RecordingServer(certificate=self.ca.issue(name, [name]))
            server.start(reactor, f"127.0.0.{n}", self.port)
            self.addCleanup(server.stop)
            self.servers[n] = server
        self.fetcher = PolicyFetcher(reactor, self.resolver, trust=load_ca_file(self.ca.ca_file),
                                     https_port=https_port, timeout=5)
        self.data = self.tmp / "Q1.msg"
        self.data.write_bytes(BODY)

    def policy(self, mode: str, mx: str) -> None:
        self.https.replies["/.well-known/mta-sts.txt"] = self.Reply(
            STS_POLICY.format(mode=mode, mx=mx).encode())

    def deliver(self) -> Any:
        route = Route("internet", via="mx", port=self.port, tls="mta-sts", ca_file=self.ca.ca_file)
        target = MXTarget(route, reactor=self.reactor, resolver=self.resolver, helo="gw.test",
                          timeouts=ClientTimeouts(connect=3, reply=5, data_done=5),
                          shuffle=lambda hosts: None, sts=self.fetcher)
        return target.deliver(_envelope("a@multi.test"), ["a@multi.test"],
                              lambda: open(self.data, "rb"))

    async def test_enforce_skips_exchangers_outside_the_policy(self) -> None:
        """mx1 is preferred and up, but not in the policy: the message goes to mx2, over TLS."""
        from tests.servers.recording_smtp import RecordingServer

        mx2 = RecordingServer(certificate=self.ca.issue("mx2.multi.test", ["mx2.multi.test"]))
        self.servers[32].stop()
        await task.deferLater(self.reactor, 0.05, lambda: None)
        mx2.start(self.reactor, "127.0.0.32", self.port)
        self.addCleanup(mx2.stop)
        self.policy("enforce", "mx2.multi.test")
        result = await self.deliver()
        self.assertEqual(result["a@multi.test"].kind, "delivered")
        self.assertEqual(result["a@multi.test"].remote_host, f"127.0.0.32:{self.port}")
        [session] = mx2.sessions
        self.assertTrue(session.tls)
        self.assertEqual(self.servers[31].sessions, [])

    async def test_enforce_requires_a_verified_certificate(self) -> None:
        """mx2's certificate names another host: under enforce that is a retry, never clear text."""
        self.servers[31].stop()
        self.policy("enforce", "mx2.multi.test")
        result = await self.deliver()
        self.assertEqual(result["a@multi.test"].kind, "retry")
        self.assertEqual(result["a@multi.test"].reply, str(outcome.TLS_VERIFY_FAILED))
        self.assertEqual(self.servers[32].sessions[0].messages, [])

    async def test_enforce_without_a_matching_exchanger_is_retried(self) -> None:
        self.policy("enforce", "*.elsewhere.test")
        result = await self.deliver()
        self.assertEqual(result["a@multi.test"].reply, str(outcome.MTA_STS_NO_MATCH))
        self.assertEqual((self.servers[31].sessions, self.servers[32].sessions), ([], []))

    async def test_testing_mode_only_logs(self) -> None:
        """A testing policy that names none of the exchangers changes nothing: mx1 takes it."""
        self.policy("testing", "*.elsewhere.test")
        result = await self.deliver()
        self.assertEqual(result["a@multi.test"].kind, "delivered")
        self.assertEqual(len(self.servers[31].sessions[0].messages), 1)

    async def test_no_policy_is_opportunistic(self) -> None:
        """Without a policy file (404) delivery is opportunistic, as without MTA-STS."""
        result = await self.deliver()
        self.assertEqual(result["a@multi.test"].kind, "delivered")
        self.assertTrue(self.servers[31].sessions[0].tls)
