"""
MTA-STS (relaygw.deliver.mtasts): the TXT record and policy parsers and MX
matching as plain asserts; discovery, fetching and caching against a real
dnsmasq and a real twisted.web HTTPS server (certificate from a test CA) on
127.0.0.41, as RFC 8461 sections 3 and 5.1 require.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from relaygw.config._model import DNS, HostPort
from relaygw.deliver.mtasts import (
    Policy,
    PolicyCache,
    PolicyFetcher,
    allowed_exchangers,
    parse_policy,
    parse_txt_record,
    select_txt_id,
)
from relaygw.deliver.mx import make_resolver
from relaygw.deliver.tlspolicy import load_ca_file
from tests.servers.dnsmasq import DNSMASQ_MISSING, Dnsmasq, dnsmasq_missing
from tests.servers.https import HTTPSServer, Reply
from tests.servers.ports import free_port
from tests.servers.recording_smtp import TestCA

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.sts.test\r\nmx: *.mx.sts.test\r\nmax_age: 86400\r\n"
PATH = "/.well-known/mta-sts.txt"
HOST = "127.0.0.41"
ID1, ID2 = "20261206T1", "20261206T2"


def _zone(policy_id: str) -> tuple[tuple[str, str], ...]:
    return (
        ("txt-record", f"_mta-sts.sts.test,v=STSv1; id={policy_id}"),
        ("host-record", f"mta-sts.sts.test,{HOST}"),
        # Two STSv1 records: no policy, whatever they say.
        ("txt-record", "_mta-sts.two.test,v=STSv1; id=one"),
        ("txt-record", "_mta-sts.two.test,v=STSv1; id=two"),
        ("host-record", f"mta-sts.two.test,{HOST}"),
    )


# --- the TXT record (section 3.1) ---


def test_txt_record_id() -> None:
    """A v=STSv1 record gives its id; extensions and a trailing delimiter are allowed."""
    assert parse_txt_record("v=STSv1; id=20160831085700Z;") == "20160831085700Z"
    assert parse_txt_record("v=STSv1;id=abc") == "abc"
    assert parse_txt_record("v=STSv1 ; id=abc ; ext_1=x.y") == "abc"


def test_txt_record_invalid() -> None:
    """A wrong version, a missing, repeated or malformed id is no record."""
    for text in (
        "v=STSv2; id=abc",
        "v=STSv1",
        "v=STSv1;",
        "v=STSv1 id=abc",
        "id=abc; v=STSv1",
        "v=STSv1; id=",
        "v=STSv1; id=" + "a" * 33,
        "v=STSv1; id=ab-c",
        "v=STSv1; id=abc; id=def",
        "v=STSv1;; id=abc",
        "v=STSv1; id=abc; broken",
    ):
        assert parse_txt_record(text) is None, text
    assert parse_txt_record("v=STSv1; id=" + "a" * 32) == "a" * 32


def test_txt_records_exactly_one() -> None:
    """Other TXT records are ignored; two STSv1 records mean no policy."""
    assert select_txt_id(["google-site-verification=x", "v=STSv1; id=abc"]) == "abc"
    assert select_txt_id(["v=STSv1; id=abc", "v=STSv1; id=def"]) is None
    assert select_txt_id(["v=STSv1; id=abc", "v=STSv1; id=bad!"]) is None
    assert select_txt_id(["v=STSv10; id=abc", "v=STSv1; id=abc"]) == "abc"
    assert select_txt_id([]) is None


# --- the policy file (section 3.2) ---


def test_policy_parsed() -> None:
    """The fields of a CRLF policy file, with the TXT record's id."""
    assert parse_policy(POLICY, ID1) == Policy(
        "enforce", ("mx1.sts.test", "*.mx.sts.test"), 86400, ID1)


def test_policy_lf_and_extensions() -> None:
    """LF lines, any field order, unknown fields and a missing final newline are fine."""
    body = "mode: testing\nmx: MX.Example.COM.\nfoo_bar: any value here\nversion: STSv1\nmax_age:600"
    assert parse_policy(body, "x") == Policy("testing", ("mx.example.com",), 600, "x")


def test_policy_mode_none_needs_no_mx() -> None:
    """A withdrawn policy (mode none) may list no exchanger."""
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n", "x")
    assert policy is not None and policy.mode == "none" and policy.mx == ()


def test_policy_max_age_capped() -> None:
    """max_age above one year is capped to one year."""
    body = "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n"
    policy = parse_policy(body, "x")
    assert policy is not None and policy.max_age == 31557600


def test_policy_invalid() -> None:
    """Anything but a well-formed STSv1 policy is no policy."""
    good = {"version": "STSv1", "mode": "enforce", "mx": "a.test", "max_age": "86400"}

    def body(**change: str | None) -> str:
        fields = {**good, **change}
        return "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)

    for text in (
        body(version="STSv2"),
        body(version=None),
        body(mode="strict"),
        body(mode=None),
        body(mx=None),
        body(mx="*.*.a.test"),
        body(mx="a.*.test"),
        body(mx="bad_name.test"),
        body(mx="-a.test"),
        body(max_age="-1"),
        body(max_age="1d"),
        body(max_age="12345678901"),
        body(max_age=None),
        body() + "mode: testing\n",
        body() + "this line has no colon\n",
        "",
    ):
        assert parse_policy(text, "x") is None, text
    assert parse_policy(b"version: STSv1\nmode: enforce\nmx: \xff.test\nmax_age: 1\n", "x") is None


# --- matching (section 4.1) ---


def test_matches_literal_case_and_dot() -> None:
    """A literal pattern matches its host in any case, with or without the root dot."""
    policy = Policy("enforce", ("mx1.sts.test",), 1, "x")
    assert policy.matches("mx1.sts.test")
    assert policy.matches("MX1.STS.test.")
    assert not policy.matches("mx2.sts.test")
    assert not policy.matches("a.mx1.sts.test")


def test_matches_wildcard_one_label() -> None:
    """*.example.com stands for exactly one more leftmost label."""
    policy = Policy("enforce", ("*.mx.sts.test",), 1, "x")
    assert policy.matches("a.mx.sts.test")
    assert policy.matches("A.MX.sts.test.")
    assert not policy.matches("mx.sts.test")
    assert not policy.matches("a.b.mx.sts.test")
    assert not policy.matches("amx.sts.test")
    assert not policy.matches(".mx.sts.test")


def test_allowed_exchangers() -> None:
    """enforce keeps the matching hosts in order; testing, none and no policy keep all."""
    hosts = ("evil.test", "a.mx.sts.test", "mx1.sts.test")
    enforce = parse_policy(POLICY, "x")
    assert allowed_exchangers(enforce, hosts) == ("a.mx.sts.test", "mx1.sts.test")
    assert allowed_exchangers(enforce, ("evil.test",)) == ()
    testing = Policy("testing", ("mx1.sts.test",), 1, "x")
    assert allowed_exchangers(testing, hosts) == hosts
    assert allowed_exchangers(Policy("none", (), 1, "x"), hosts) == hosts
    assert allowed_exchangers(None, hosts) == hosts


def test_cache_is_bounded() -> None:
    """The least recently used domain is dropped beyond the cache size."""
    from relaygw.deliver.mtasts import _Entry

    cache = PolicyCache(size=2)
    cache.put("a.test", _Entry(None, 1.0))
    cache.put("b.test", _Entry(None, 1.0))
    assert cache.get("a.test") is not None
    cache.put("c.test", _Entry(None, 1.0))
    assert len(cache) == 2
    assert cache.get("b.test") is None
    assert cache.get("a.test") is not None


# --- discovery over the network ---


@pytest.mark.skipif(dnsmasq_missing(), reason=DNSMASQ_MISSING)
class FetcherTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.tmp = Path(tempfile.mkdtemp(prefix="relaygw-sts-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca = TestCA(self.tmp)
        self.trust = load_ca_file(self.ca.ca_file)
        self.port = free_port(HOST)
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.cache = PolicyCache()
        self.resolver = self.dns(ID1)

    def dns(self, policy_id: str) -> Any:
        """A dnsmasq serving policy id C{policy_id} for sts.test, and a resolver asking it."""
        server = Dnsmasq(self.tmp / f"dns-{policy_id}", extra=_zone(policy_id)).start()
        self.addCleanup(server.stop)
        self.dns_server = server
        return make_resolver(DNS(servers=(HostPort("127.0.0.1", server.port),)),
                             self.reactor, timeout=(1,))

    def serve(self, reply: Reply | None = Reply(POLICY), name: str = "mta-sts.sts.test") -> HTTPSServer:
        """The policy host on 127.0.0.41, its certificate naming C{name}."""
        server = HTTPSServer(self.reactor, self.ca.issue(name, [name]), HOST, self.port)
        if reply is not None:
            server.replies[PATH] = reply
        server.start()
        self.addCleanup(server.stop)
        return server

    def fetcher(self, resolver: Any = None, **kwargs: Any) -> PolicyFetcher:
        kwargs.setdefault("trust", self.trust)
        kwargs.setdefault("cache", self.cache)
        return PolicyFetcher(
            self.reactor, resolver or self.resolver, clock=self.clock,
            https_port=self.port, timeout=5, **kwargs)

    async def test_policy_fetched(self) -> None:
        """
        The TXT record leads to the policy file, fetched over verified HTTPS
        and parsed; mta-sts.sts.test exists only in dnsmasq, so the policy
        host was resolved with the injected resolver.
        """
        server = self.serve()
        policy = await self.fetcher().lookup("STS.test.")
        self.assertEqual(policy, Policy("enforce", ("mx1.sts.test", "*.mx.sts.test"), 86400, ID1))
        [seen] = server.requests
        self.assertEqual((seen.method, seen.path, seen.host),
                         ("GET", PATH, f"mta-sts.sts.test:{self.port}"))

    async def test_cached(self) -> None:
        """While the id is unchanged and max_age not over, no second request is made."""
        server = self.serve()
        fetcher = self.fetcher()
        first = await fetcher.lookup("sts.test")
        self.clock.advance(86399)
        second = await fetcher.lookup("sts.test")
        self.assertIsNotNone(first)
        self.assertEqual(first, second)
        self.assertEqual(len(server.requests), 1)

    async def test_concurrent_lookups_share_one_fetch(self) -> None:
        """Lookups of one domain while one is under way wait for it."""
        server = self.serve()
        fetcher = self.fetcher()
        both = [fetcher.lookup("sts.test"), fetcher.lookup("sts.test")]
        self.assertEqual(await both[0], await both[1])
        self.assertEqual(len(server.requests), 1)

    async def test_id_change_refetches(self) -> None:
        """A new id in the TXT record fetches the policy again."""
        server = self.serve()
        await self.fetcher().lookup("sts.test")
        server.replies[PATH] = Reply(POLICY.replace(b"enforce", b"testing"))
        policy = await self.fetcher(self.dns(ID2)).lookup("sts.test")
        assert policy is not None
        self.assertEqual((policy.id, policy.mode), (ID2, "testing"))
        self.assertEqual(len(server.requests), 2)

    async def test_max_age_expiry_refetches(self) -> None:
        """Past max_age the policy is fetched again, even with the same id."""
        server = self.serve()
        fetcher = self.fetcher()
        await fetcher.lookup("sts.test")
        self.clock.advance(86401)
        self.assertIsNotNone(await fetcher.lookup("sts.test"))
        self.assertEqual(len(server.requests), 2)

    async def test_server_down_uses_cached_policy(self) -> None:
        """A failed fetch keeps an unexpired cached policy; an expired one is not used."""
        server = self.serve()
        cached = await self.fetcher().lookup("sts.test")
        await server.stop()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        other = self.fetcher(self.dns(ID2))
        self.assertEqual(await other.lookup("sts.test"), cached)
        [warning] = [e for e in events if e.get("reason")]
        self.assertEqual((warning["domain"], warning["policy_id"], warning["cached"]),
                         ("sts.test", ID2, True))
        self.clock.advance(86401)
        self.assertIsNone(await other.lookup("sts.test"))

    async def test_dns_failure_keeps_cached_policy(self) -> None:
        """A TXT lookup that times out keeps an unexpired cached policy."""
        self.serve()
        fetcher = self.fetcher()
        cached = await fetcher.lookup("sts.test")
        self.dns_server.stop()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.assertEqual(await fetcher.lookup("sts.test"), cached)
        self.assertEqual([e["domain"] for e in events if e.get("reason")], ["sts.test"])

    def test_provides_interfaces(self) -> None:
        """The HTTPS endpoint factory and its endpoints provide Twisted's contracts."""
        from twisted.internet.interfaces import IStreamClientEndpoint
        from twisted.web.client import URI
        from twisted.web.iweb import IAgentEndpointFactory
        from zope.interface.verify import verifyObject

        from relaygw.deliver.mtasts import _Endpoints

        factory = _Endpoints(self.reactor, self.resolver, self.trust, 1.0)
        self.assertTrue(verifyObject(IAgentEndpointFactory, factory))
        endpoint = factory.endpointForURI(URI.fromBytes(b"https://mta-sts.sts.test/x"))
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))

    async def test_no_txt_record_keeps_cached_policy(self) -> None:
        """A missing record does not drop an unexpired cached policy (section 3.1's note)."""
        self.serve()
        cached = await self.fetcher().lookup("sts.test")
        server = Dnsmasq(self.tmp / "dns-empty").start()  # the base zone only: no _mta-sts
        self.addCleanup(server.stop)
        empty = make_resolver(DNS(servers=(HostPort("127.0.0.1", server.port),)),
                              self.reactor, timeout=(1,))
        self.assertEqual(await self.fetcher(empty).lookup("sts.test"), cached)
        self.assertIsNone(await self.fetcher(empty, cache=PolicyCache()).lookup("sts.test"))

    async def test_no_txt_record_no_policy(self) -> None:
        """Without the record, no policy and no HTTP request."""
        server = self.serve()
        self.assertIsNone(await self.fetcher().lookup("aonly.test"))
        self.assertIsNone(await self.fetcher().lookup("nothing.test"))
        self.assertEqual(server.requests, [])

    async def test_two_txt_records_no_policy(self) -> None:
        """Two STSv1 records: no policy, and the policy host is not asked."""
        server = self.serve()
        self.assertIsNone(await self.fetcher().lookup("two.test"))
        self.assertEqual(server.requests, [])

    async def test_wrong_certificate_name(self) -> None:
        """A certificate from a trusted CA that names another host gives no policy."""
        server = self.serve(name="www.sts.test")
        self.assertIsNone(await self.fetcher().lookup("sts.test"))
        self.assertEqual(server.requests, [])

    async def test_untrusted_certificate(self) -> None:
        """The system store does not trust the test CA: no policy."""
        server = self.serve()
        self.assertIsNone(await self.fetcher(trust=None).lookup("sts.test"))
        self.assertEqual(server.requests, [])

    async def test_redirect_not_followed(self) -> None:
        """A 3xx is a failed fetch, and its Location is never requested."""
        server = self.serve(Reply(b"", 301, headers=(
            ("location", f"https://mta-sts.sts.test:{self.port}/elsewhere"),)))
        server.replies["/elsewhere"] = Reply(POLICY)
        self.assertIsNone(await self.fetcher().lookup("sts.test"))
        self.assertEqual([r.path for r in server.requests], [PATH])

    async def test_not_found(self) -> None:
        """A 404 gives no policy."""
        server = self.serve(None)
        self.assertIsNone(await self.fetcher().lookup("sts.test"))
        self.assertEqual(len(server.requests), 1)

    async def test_failed_fetch_not_retried_at_once(self) -> None:
        """A failed fetch of one id waits the retry interval before the next try."""
        server = self.serve(None)
        fetcher = self.fetcher(retry_interval=60)
        self.assertIsNone(await fetcher.lookup("sts.test"))
        self.assertIsNone(await fetcher.lookup("sts.test"))
        self.assertEqual(len(server.requests), 1)
        server.replies[PATH] = Reply(POLICY)
        self.clock.advance(61)
        self.assertIsNotNone(await fetcher.lookup("sts.test"))
        self.assertEqual(len(server.requests), 2)

    async def test_wrong_media_type(self) -> None:
        """A policy served as anything but text/plain is not used."""
        self.serve(Reply(POLICY, content_type="text/html"))
        self.assertIsNone(await self.fetcher().lookup("sts.test"))

    async def test_media_type_parameters_allowed(self) -> None:
        """text/plain with a charset parameter is text/plain."""
        self.serve(Reply(POLICY, content_type="text/plain; charset=utf-8"))
        self.assertIsNotNone(await self.fetcher().lookup("sts.test"))

    async def test_body_limit(self) -> None:
        """A body over the limit is not read to its end and gives no policy."""
        self.serve(Reply(POLICY + b"x: " + b"y" * 70_000 + b"\n"))
        self.assertIsNone(await self.fetcher().lookup("sts.test"))

    async def test_invalid_policy(self) -> None:
        """A policy file that does not parse gives no policy."""
        self.serve(Reply(b"version: STSv1\nmode: enforce\n"))
        self.assertIsNone(await self.fetcher().lookup("sts.test"))

    async def test_timeout(self) -> None:
        """A policy host that accepts but never answers is given up after the timeout."""
        import socket

        silent = socket.socket()
        silent.bind((HOST, self.port))
        silent.listen(1)
        self.addCleanup(silent.close)
        fetcher = PolicyFetcher(self.reactor, self.resolver, clock=self.clock, trust=self.trust,
                                https_port=self.port, timeout=0.5)
        started = self.reactor.seconds()
        self.assertIsNone(await fetcher.lookup("sts.test"))
        self.assertLess(self.reactor.seconds() - started, 3)
